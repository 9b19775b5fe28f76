//! 5 hosts x 20 no-op steps through the whole pipeline: real agents on 127.0.0.x, mutual TLS,
//! journal fsync, probes, and (for the teardown) barriers with re-probes and a token. Then the
//! same with 1 host, where no hosts run concurrently.
//!
//! W is the wall time of one `tollgate deploy` / `tollgate execute` CLI invocation. B, the
//! baseline, is the bare work inside W without any orchestration, measured right after each W
//! (so both see the same machine load): one trivial CLI start (`tollgate --version`), then one
//! worker per host, all concurrent (as the agents are), each running one after the other as many
//! processes as that host's agent ran in W (`probe_reported` + `check_reported` +
//! `step_reported` events of that run in `timeline.jsonl`), each started the way
//! `agent/src/exec.rs` starts a script. The orchestration overhead is the median over the
//! repetitions of W - B, divided by hosts x steps (per step per host) and by steps (per step
//! round: the hosts run a step concurrently).
//!
//! Prints medians; asserts nothing about time. `BENCH_REPS` sets the repetitions (default 5).
//! Lines starting `RESULT ` are for `bench/run.sh`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

use tokio::io::AsyncReadExt;
use tokio::process::Command;
use tollgate_tests::evidence::count_lines;
use tollgate_tests::lab::{CliOut, Lab};

const STEPS: usize = 20;
const STEP_SCRIPT: &str = "true";
const PROBE_SCRIPT: &str = "cat \"$TOLLGATE_AGENT_STATE/../facts.json\"";

/// 20 no-op steps per action in 4 phases of 5; in teardown, phases 2 and 4 are destructive.
fn operations() -> String {
    let mut s = String::new();
    for action in ["deploy", "teardown"] {
        for phase in 0..4 {
            let _ = writeln!(s, "[[{action}.phases]]\nname = \"p{phase}\"");
            for step in 0..STEPS / 4 {
                let destructive = action == "teardown" && phase % 2 == 1;
                let _ = writeln!(
                    s,
                    "[[{action}.phases.steps]]\nid = \"s{phase}-{step}\"\nroles = [\"web\"]\nshell = \"sh\"\nrun = {STEP_SCRIPT:?}\ndestructive = {destructive}\ntimeout = \"30s\"\n"
                );
            }
        }
    }
    let _ = writeln!(s, "[probes.web]\nshell = \"sh\"\nrun = {PROBE_SCRIPT:?}");
    s
}

/// The upper median (the middle one for an odd count).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Per step per host: `x` spread over `hosts` x 20 steps (1 host: per step round).
fn per(x: f64, hosts: usize) -> f64 {
    x / (hosts * STEPS) as f64
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

/// Process executions per host (probe scripts, step scripts) recorded in a run's timeline from
/// line `from` on. Checks run a script too; this bench defines none, so they would count as steps.
fn executions(timeline: &Path, from: usize) -> BTreeMap<String, (usize, usize)> {
    let mut per_host: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for line in std::fs::read_to_string(timeline)
        .unwrap()
        .lines()
        .skip(from)
    {
        let ev: serde_json::Value = serde_json::from_str(line).unwrap();
        let Some(host) = ev["host"].as_str() else {
            continue;
        };
        let n = per_host.entry(host.to_string()).or_default();
        match ev["kind"].as_str() {
            Some("probe_reported") => n.0 += 1,
            Some("step_reported" | "check_reported") => n.1 += 1,
            _ => {}
        }
    }
    per_host
}

/// What `agent/src/exec.rs` does to run one script, without the agent around it: write the
/// script file, start `sh FILE` in its own process group with the agent's environment, stdin
/// null, stdout and stderr piped and read to EOF, wait for it, remove the file.
async fn run_like_agent(file: &Path, script: &str, state_dir: &Path) {
    std::fs::write(file, script).unwrap();
    let mut child = Command::new("sh")
        .arg(file)
        .env("TOLLGATE_AGENT_ID", "spiffe://test/agent/baseline")
        .env("TOLLGATE_AGENT_STATE", state_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0)
        .spawn()
        .unwrap();
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let (mut o, mut e) = (Vec::new(), Vec::new());
    let (r1, r2) = tokio::join!(out.read_to_end(&mut o), err.read_to_end(&mut e));
    r1.unwrap();
    r2.unwrap();
    assert!(
        child.wait().await.unwrap().success(),
        "{}",
        String::from_utf8_lossy(&e)
    );
    std::fs::remove_file(file).unwrap();
}

/// B: one trivial CLI start, then per host (concurrently) its probe and step executions in turn.
async fn baseline(lab: &Lab, execs: &BTreeMap<String, (usize, usize)>) -> f64 {
    let t = Instant::now();
    let out = lab.cli("alice", &["--version"]).await.unwrap();
    assert_eq!(out.code, 0, "{out:?}");
    let workers: Vec<_> = execs
        .iter()
        .map(|(host, &(probes, steps))| {
            let state_dir = lab.agents[host].state_dir.clone();
            let file = lab.home(host).join("baseline.sh");
            tokio::spawn(async move {
                for i in 0..probes + steps {
                    let script = if i < probes {
                        PROBE_SCRIPT
                    } else {
                        STEP_SCRIPT
                    };
                    run_like_agent(&file, script, &state_dir).await;
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    ms(t)
}

/// Per repetition: W, B, and the executions per host B ran.
#[derive(Default)]
struct Series {
    w: Vec<f64>,
    b: Vec<f64>,
    execs: Vec<usize>,
}

impl Series {
    /// Times `run` (W), checks it completed, then measures B for the executions it caused.
    async fn measure<F: Future<Output = CliOut>>(
        &mut self,
        lab: &Lab,
        timeline_before: Option<PathBuf>,
        run: F,
    ) {
        let from = timeline_before.as_deref().map_or(0, count_lines);
        let t = Instant::now();
        let out = run.await;
        self.w.push(ms(t));
        assert_eq!(out.outcome(), "Completed", "{out:?}");
        let run_id = out.json()["run_id"].as_str().unwrap().to_string();
        let timeline = lab.runs_dir().join(run_id).join("timeline.jsonl");
        let execs = executions(&timeline, from);
        assert_eq!(execs.len(), lab.agents.len(), "{execs:?}");
        self.execs.extend(execs.values().map(|(p, s)| p + s));
        self.b.push(baseline(lab, &execs).await);
    }

    fn w(&self) -> f64 {
        median(self.w.clone())
    }

    fn b(&self) -> f64 {
        median(self.b.clone())
    }

    fn differences(&self) -> Vec<f64> {
        self.w.iter().zip(&self.b).map(|(w, b)| w - b).collect()
    }

    /// Median over the repetitions of W - B.
    fn overhead(&self) -> f64 {
        median(self.differences())
    }

    /// Lowest and highest W - B, to show the noise.
    fn spread(&self) -> String {
        let d = self.differences();
        let min = d.iter().copied().fold(f64::INFINITY, f64::min);
        let max = d.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        format!("{min:.0}..{max:.0} ms")
    }

    /// Agent executions per host, "21" or "21-22" if hosts or repetitions differed.
    fn execs(&self) -> String {
        let (lo, hi) = (
            self.execs.iter().min().unwrap(),
            self.execs.iter().max().unwrap(),
        );
        if lo == hi {
            lo.to_string()
        } else {
            format!("{lo}-{hi}")
        }
    }
}

/// Runs `reps` repetitions of deploy and teardown execute on a fresh lab of `hosts` hosts.
async fn bench(hosts: usize, reps: usize) -> (Series, Series) {
    let names: Vec<String> = (1..=hosts).map(|i| format!("web{i}")).collect();
    let inventory: Vec<(&str, &str, &str)> = names
        .iter()
        .map(|n| (n.as_str(), "web", "disposable"))
        .collect();
    let lab = Lab::start_with(&inventory, &operations(), "", Vec::new())
        .await
        .unwrap();
    let (mut deploy, mut teardown) = (Series::default(), Series::default());
    for _ in 0..reps {
        deploy
            .measure(&lab, None, async {
                lab.cli("alice", &["deploy"]).await.unwrap()
            })
            .await;
        let (run, token, _) = lab.approved_teardown(&names.join(",")).await.unwrap();
        let timeline = lab.runs_dir().join(&run).join("timeline.jsonl");
        let execute = async {
            lab.cli("alice", &["execute", &run, "--token", &token])
                .await
                .unwrap()
        };
        teardown.measure(&lab, Some(timeline), execute).await;
    }
    (deploy, teardown)
}

fn main() {
    let reps: usize = std::env::var("BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (d5, t5) = rt.block_on(bench(5, reps));
    let (d1, t1) = rt.block_on(bench(1, reps));

    println!(
        "pipeline: {STEPS} no-op steps on 5 hosts, then on 1 host; {reps} repetitions, medians"
    );
    println!(
        "  W  = end to end: one `tollgate deploy` / `tollgate execute` CLI invocation (CLI start, probes, steps, journal fsync, ...)"
    );
    println!(
        "  B  = baseline: the same process executions without orchestration: one `tollgate --version`, then per host (hosts concurrently) as many `sh FILE` runs as its agent ran in W"
    );
    println!("  W - B = orchestration overhead, median of the per-repetition differences;");
    println!(
        "          per step per host = (W - B) / (hosts x {STEPS}); per step round = (W - B) / {STEPS} (the hosts run each step concurrently)"
    );
    println!(
        "| run | hosts | W | B | agent executions per host | W - B | W - B lowest..highest | W - B per step per host | W - B per step round | W per step per host |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let (deploy, teardown) = (
        "quick deploy (probe, plan, 20 steps)",
        "full teardown execute (token, 2 barriers with re-probes, 20 steps)",
    );
    for (what, hosts, s) in [
        (deploy, 5, &d5),
        (teardown, 5, &t5),
        (deploy, 1, &d1),
        (teardown, 1, &t1),
    ] {
        println!(
            "| {what} | {hosts} | {:.1} ms | {:.1} ms | {} | {:.1} ms | {} | {:.2} ms | {:.2} ms | {:.2} ms |",
            s.w(),
            s.b(),
            s.execs(),
            s.overhead(),
            s.spread(),
            per(s.overhead(), hosts),
            per(s.overhead(), 1),
            per(s.w(), hosts),
        );
    }
    let result = |key: &str, v: f64, digits: usize| println!("RESULT {key}={v:.digits$}");
    println!("RESULT pipeline_reps={reps}");
    for (name, s) in [("deploy", &d5), ("teardown", &t5)] {
        result(&format!("pipeline_{name}_ms"), s.w(), 1);
        result(&format!("pipeline_{name}_per_step_ms"), per(s.w(), 5), 2);
        result(&format!("pipeline_baseline_{name}_ms"), s.b(), 1);
        println!("RESULT pipeline_{name}_execs_per_host={}", s.execs());
        result(&format!("pipeline_{name}_overhead_ms"), s.overhead(), 1);
        result(
            &format!("pipeline_{name}_overhead_ms_per_step_host"),
            per(s.overhead(), 5),
            2,
        );
        result(
            &format!("pipeline_{name}_overhead_ms_per_step_round"),
            per(s.overhead(), 1),
            2,
        );
    }
    for (name, s) in [("deploy", &d1), ("teardown", &t1)] {
        result(&format!("pipeline_1host_{name}_ms"), s.w(), 1);
        result(&format!("pipeline_1host_baseline_{name}_ms"), s.b(), 1);
        println!("RESULT pipeline_1host_{name}_execs={}", s.execs());
        result(
            &format!("pipeline_1host_{name}_overhead_ms"),
            s.overhead(),
            1,
        );
        result(
            &format!("pipeline_1host_{name}_overhead_ms_per_step"),
            per(s.overhead(), 1),
            2,
        );
    }
}
