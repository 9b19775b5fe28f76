//! 5 hosts x 20 no-op steps through the whole pipeline: real agents on 127.0.0.x, mutual TLS,
//! journal fsync, probes, and (for the teardown) barriers with re-probes and a token.
//! Prints medians; asserts nothing about time. `BENCH_REPS` sets the repetitions (default 5).
//! Lines starting `RESULT ` are for `bench/run.sh`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fmt::Write;
use std::time::{Duration, Instant};

use tollgate_tests::lab::Lab;

const HOSTS: usize = 5;
const STEPS: usize = 20;

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
                    "[[{action}.phases.steps]]\nid = \"s{phase}-{step}\"\nroles = [\"web\"]\nshell = \"sh\"\nrun = \"true\"\ndestructive = {destructive}\ntimeout = \"30s\"\n"
                );
            }
        }
    }
    s.push_str(
        "[probes.web]\nshell = \"sh\"\nrun = \"cat \\\"$TOLLGATE_AGENT_STATE/../facts.json\\\"\"\n",
    );
    s
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
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
    rt.block_on(async {
        let names: Vec<String> = (1..=HOSTS).map(|i| format!("web{i}")).collect();
        let hosts: Vec<(&str, &str, &str)> = names.iter().map(|n| (n.as_str(), "web", "disposable")).collect();
        let lab = Lab::start_with(&hosts, &operations(), "", Vec::new()).await.unwrap();
        let (mut deploys, mut teardowns) = (Vec::new(), Vec::new());
        for _ in 0..reps {
            let t = Instant::now();
            let out = lab.cli("alice", &["deploy"]).await.unwrap();
            deploys.push(t.elapsed());
            assert_eq!(out.outcome(), "Completed", "{out:?}");
            let (run, token, _) = lab.approved_teardown(&names.join(",")).await.unwrap();
            let t = Instant::now();
            let out = lab.cli("alice", &["execute", &run, "--token", &token]).await.unwrap();
            teardowns.push(t.elapsed());
            assert_eq!(out.outcome(), "Completed", "{out:?}");
        }
        let (d, t) = (median(deploys), median(teardowns));
        let per = |x: Duration| x.as_secs_f64() * 1000.0 / (HOSTS * STEPS) as f64;
        println!("pipeline: {HOSTS} hosts x {STEPS} no-op steps, {reps} repetitions, medians (each includes one CLI process start)");
        println!("| run | end to end | per step per host |");
        println!("|---|---|---|");
        println!("| quick deploy (probe, plan, 20 steps, journal fsync) | {:.1} ms | {:.2} ms |", d.as_secs_f64() * 1000.0, per(d));
        println!("| full teardown execute (token, 2 barriers with re-probes, 20 steps) | {:.1} ms | {:.2} ms |", t.as_secs_f64() * 1000.0, per(t));
        println!("RESULT pipeline_reps={reps}");
        println!("RESULT pipeline_deploy_ms={:.1}", d.as_secs_f64() * 1000.0);
        println!("RESULT pipeline_teardown_ms={:.1}", t.as_secs_f64() * 1000.0);
        println!("RESULT pipeline_deploy_per_step_ms={:.2}", per(d));
        println!("RESULT pipeline_teardown_per_step_ms={:.2}", per(t));
    });
}
