//! Probe fan-out across many simulated agents (`tollgate-sim-agents`, one real QUIC endpoint
//! with its own agent certificate per host, all on 127.0.0.1) driven by a real `tollgate serve`
//! process: one quick `tollgate deploy` with one no-op step on every host.
//!
//! Reports, from the run's `timeline.jsonl`, the per-host probe latency (`probe_requested` to
//! that host's `probe_reported`, i.e. until the answer is journaled and fsynced), the same from
//! the simulator's side (until the answer was written on the wire), and the coordinator's peak
//! RSS (`VmHWM` of the serve process). Asserts nothing about time.
//!
//! `FANOUT_HOSTS` (default 1000) sets the host count; `FANOUT_SERVE_WRAP` prefixes the serve
//! command (a profiler); `FANOUT_COORDINATOR_EXTRA` is appended
//! to `coordinator.toml` (e.g. `[probe]\ntimeout = "30s"`). Lines starting `RESULT ` are for
//! `bench/run.sh`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tollgate_certs::Role;
use tollgate_coordinator::lab;
use tollgate_tests::bins;
use tollgate_tests::fleet::TestPki;

const OPERATIONS: &str = r#"[[deploy.phases]]
name = "noop"
[[deploy.phases.steps]]
id = "noop"
roles = ["web"]
shell = "sh"
run = "true"
destructive = false
timeout = "30s"

[[teardown.phases]]
name = "noop"
[[teardown.phases.steps]]
id = "noop"
roles = ["web"]
shell = "sh"
run = "true"
destructive = false
timeout = "30s"
"#;

/// Reads stdout lines until one starts with `prefix`; returns the rest of that line.
async fn wait_line(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    prefix: &str,
    limit: Duration,
    what: &str,
) -> anyhow::Result<String> {
    tokio::time::timeout(limit, async {
        while let Some(line) = lines.next_line().await? {
            if let Some(rest) = line.strip_prefix(prefix) {
                return Ok(rest.to_string());
            }
        }
        anyhow::bail!("{what} exited before it was ready")
    })
    .await
    .with_context(|| format!("{what} was not ready within {limit:?}"))?
}

fn status_kb(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// `Udp: RcvbufErrors` of this network namespace: datagrams dropped because a socket's receive
/// buffer was full (counts every process in the namespace).
fn udp_rcvbuf_errors() -> u64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp: "));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// CPU time (user + system, ms) the process `pid` has used so far, from `/proc/PID/stat`.
fn cpu_ms(pid: u32, ticks_per_s: u64) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    f.iter().sum::<u64>() * 1000 / ticks_per_s.max(1)
}

fn clock_ticks() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn main() {
    let hosts: usize = std::env::var("FANOUT_HOSTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let extra = std::env::var("FANOUT_COORDINATOR_EXTRA").unwrap_or_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let pki = TestPki::new().unwrap();
    if let Err(e) = rt.block_on(run(&pki, hosts, &extra)) {
        eprintln!("fanout: FAILED: {e:#}");
        eprintln!("fanout: kept {} for inspection", pki.dir.keep().display());
        std::process::exit(1);
    }
}

async fn run(pki: &TestPki, hosts: usize, extra: &str) -> anyhow::Result<()> {
    pki.identity(Role::Operator, Some("alice"))?;
    let root = pki.root().to_path_buf();
    let (inventory, ops, config, probe_log) = (
        root.join("inventory.toml"),
        root.join("operations.toml"),
        root.join("coordinator.toml"),
        root.join("sim-probes.log"),
    );

    // 1. The simulated agents.
    let t = Instant::now();
    let mut sim = Command::new(bins::path("tollgate-sim-agents")?)
        .arg("--pki")
        .arg(pki.pki.dir())
        .arg("--count")
        .arg(hosts.to_string())
        .arg("--inventory")
        .arg(&inventory)
        .arg("--probe-log")
        .arg(&probe_log)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut sim_lines = BufReader::new(sim.stdout.take().context("sim stdout")?).lines();
    wait_line(
        &mut sim_lines,
        "tollgate-sim-agents listening ",
        Duration::from_secs(600),
        "tollgate-sim-agents",
    )
    .await?;
    let sim_setup = t.elapsed();

    // 2. A real coordinator with those hosts.
    std::fs::write(&ops, OPERATIONS)?;
    std::fs::write(
        &config,
        lab::coordinator_toml(
            &pki.pki,
            "127.0.0.1:0".parse()?,
            &root.join("state"),
            &inventory,
            &ops,
            &[("alice", &["operator", "approver"])],
            extra,
        )?,
    )?;
    let serve_log = std::fs::File::create(root.join("serve.log"))?;
    // FANOUT_SERVE_WRAP (e.g. `heaptrack -o /tmp/serve`) runs the coordinator under a profiler.
    let wrap: Vec<String> = std::env::var("FANOUT_SERVE_WRAP")
        .unwrap_or_default()
        .split_whitespace()
        .map(String::from)
        .collect();
    let mut serve = match wrap.split_first() {
        Some((tool, args)) => {
            let mut c = Command::new(tool);
            c.args(args).arg(bins::path("tollgate")?);
            c
        }
        None => Command::new(bins::path("tollgate")?),
    };
    let mut serve = serve
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::from(serve_log))
        .kill_on_drop(true)
        .spawn()?;
    let serve_pid = serve.id().context("serve pid")?;
    let mut serve_lines = BufReader::new(serve.stdout.take().context("serve stdout")?).lines();
    let rest = wait_line(
        &mut serve_lines,
        "tollgate serve listening on ",
        Duration::from_secs(120),
        "tollgate serve",
    )
    .await
    .with_context(|| format!("see {}", root.join("serve.log").display()))?;
    tokio::spawn(async move { while let Ok(Some(_)) = serve_lines.next_line().await {} });
    let addr = rest
        .split_whitespace()
        .next()
        .context("serve address")?
        .parse()?;
    let client = root.join("client-alice.toml");
    std::fs::write(&client, lab::client_toml(&pki.pki, "alice", addr)?)?;
    let rss_before = status_kb(serve_pid, "VmRSS:").unwrap_or(0);

    // 3. Quick deploys across every host: the first meets every agent for the first time
    //    (a QUIC + mTLS handshake each), the second finds the links the first one opened.
    let mut results = Vec::new();
    for label in ["cold", "warm"] {
        let r = deploy(&root, &client, &probe_log, serve_pid, hosts).await?;
        let ms = |v: u64| format!("{v} ms");
        println!(
            "fanout ({label}): {hosts} simulated agents (setup {:.1} s), quick deploy with 1 no-op step: outcome {} in {:.2} s, {} timeline events; failed probes: {}; UDP receive-buffer drops during the deploy: {}; coordinator CPU {} ms",
            sim_setup.as_secs_f64(),
            r.outcome,
            r.deploy.as_secs_f64(),
            r.events,
            r.failures,
            r.udp_drops,
            r.serve_cpu_ms,
        );
        println!(
            "| {label} | probes ok | failed | p50 (journaled) | p99 (journaled) | max | p50 (on the wire) | p99 (on the wire) | serve RSS idle | serve peak RSS (VmHWM) |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|");
        println!(
            "| | {} / {hosts} | {} | {} | {} | {} | {} | {} | {:.1} MB | {:.1} MB |",
            r.journaled.len(),
            r.failed,
            ms(percentile(&r.journaled, 50.0)),
            ms(percentile(&r.journaled, 99.0)),
            ms(r.journaled.last().copied().unwrap_or(0)),
            ms(percentile(&r.wire, 50.0)),
            ms(percentile(&r.wire, 99.0)),
            rss_before as f64 / 1024.0,
            r.hwm_kb as f64 / 1024.0,
        );
        println!("RESULT fanout_{label}_outcome={}", r.outcome);
        println!(
            "RESULT fanout_{label}_deploy_s={:.2}",
            r.deploy.as_secs_f64()
        );
        println!("RESULT fanout_{label}_reported={}", r.journaled.len());
        println!("RESULT fanout_{label}_probe_failed={}", r.failed);
        println!("RESULT fanout_{label}_probe_failures={}", r.failures);
        println!("RESULT fanout_{label}_udp_drops={}", r.udp_drops);
        println!("RESULT fanout_{label}_serve_cpu_ms={}", r.serve_cpu_ms);
        println!(
            "RESULT fanout_{label}_p50_ms={}",
            percentile(&r.journaled, 50.0)
        );
        println!(
            "RESULT fanout_{label}_p99_ms={}",
            percentile(&r.journaled, 99.0)
        );
        println!(
            "RESULT fanout_{label}_wire_p50_ms={}",
            percentile(&r.wire, 50.0)
        );
        println!(
            "RESULT fanout_{label}_wire_p99_ms={}",
            percentile(&r.wire, 99.0)
        );
        println!(
            "RESULT fanout_{label}_rss_peak_mb={:.1}",
            r.hwm_kb as f64 / 1024.0
        );
        results.push(r);
    }
    println!("RESULT fanout_hosts={hosts}");
    println!(
        "RESULT fanout_rss_idle_mb={:.1}",
        rss_before as f64 / 1024.0
    );
    drop(sim.stdin.take());
    let _ = serve.start_kill();
    let _ = serve.wait().await;
    let _ = tokio::time::timeout(Duration::from_secs(10), sim.wait()).await;
    // The benchmark "ran" if at least the warm deploy reached every host; a cold deploy that
    // did not is a finding, reported above, not a harness failure.
    let ran = results
        .iter()
        .any(|r| r.outcome == "Completed" && r.journaled.len() == hosts);
    anyhow::ensure!(
        ran,
        "no deploy completed on every host (serve log: {})",
        root.join("serve.log").display()
    );
    Ok(())
}

#[derive(Debug)]
struct DeployStats {
    outcome: String,
    deploy: Duration,
    events: usize,
    failed: usize,
    failures: String,
    udp_drops: u64,
    hwm_kb: u64,
    /// CPU time the coordinator (serve) used during the deploy.
    serve_cpu_ms: u64,
    /// Per-host latencies (ms) of successful probes, sorted.
    journaled: Vec<u64>,
    wire: Vec<u64>,
}

async fn deploy(
    root: &std::path::Path,
    client: &std::path::Path,
    probe_log: &std::path::Path,
    serve_pid: u32,
    hosts: usize,
) -> anyhow::Result<DeployStats> {
    let runs = root.join("state").join("runs");
    let seen: Vec<std::path::PathBuf> = std::fs::read_dir(&runs)
        .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    let drops_before = udp_rcvbuf_errors();
    let ticks = clock_ticks();
    let cpu_before = cpu_ms(serve_pid, ticks);
    let t = Instant::now();
    let out = tokio::time::timeout(
        Duration::from_secs(600),
        Command::new(bins::path("tollgate")?)
            .args(["deploy", "--json"])
            .env("TOLLGATE_CLIENT", client)
            .output(),
    )
    .await
    .context("tollgate deploy did not finish in 600 s")??;
    let deploy = t.elapsed();
    let serve_cpu_ms = cpu_ms(serve_pid, ticks).saturating_sub(cpu_before);
    let hwm_kb = status_kb(serve_pid, "VmHWM:").unwrap_or(0);
    let udp_drops = udp_rcvbuf_errors().saturating_sub(drops_before);
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let outcome = match &answer["outcome"] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Object(m) => m.keys().next().cloned().unwrap_or_default(),
        _ => String::new(),
    };
    if outcome != "Completed" {
        eprintln!(
            "fanout: deploy answered {outcome:?} (exit {}); stderr: {}",
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr)
                .chars()
                .take(1000)
                .collect::<String>()
        );
    }

    // Probe latencies from the timeline (and from the simulator's side).
    let run_dir = std::fs::read_dir(&runs)
        .with_context(|| format!("{}", runs.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| !seen.contains(p) && p.join("timeline.jsonl").exists())
        .context("no new run with a timeline")?;
    let mut requested: Option<u64> = None;
    let mut reported: BTreeMap<String, u64> = BTreeMap::new();
    let mut failures: BTreeMap<String, usize> = BTreeMap::new();
    let mut events = 0usize;
    for line in std::fs::read_to_string(run_dir.join("timeline.jsonl"))?.lines() {
        let ev: serde_json::Value = serde_json::from_str(line)?;
        events += 1;
        let at = ev["at_ms"].as_u64().unwrap_or(0);
        match ev["kind"].as_str() {
            Some("probe_requested") if requested.is_none() => requested = Some(at),
            Some("probe_reported") => match ev["inputs"]["failure"].as_str() {
                Some(why) => *failures.entry(why.to_string()).or_default() += 1,
                None => {
                    if let Some(h) = ev["host"].as_str() {
                        reported.entry(h.to_string()).or_insert(at);
                    }
                }
            },
            _ => {}
        }
    }
    let start = requested.context("no probe_requested event")?;
    let failed: usize = failures.values().sum();
    let failures = if failures.is_empty() {
        "none".to_string()
    } else {
        failures
            .iter()
            .map(|(k, v)| format!("{v} {k}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut journaled: Vec<u64> = reported
        .values()
        .map(|&a| a.saturating_sub(start))
        .collect();
    journaled.sort_unstable();
    let mut wire: Vec<u64> = std::fs::read_to_string(probe_log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .filter(|&a| a >= start)
        .map(|a| a - start)
        .collect();
    wire.sort_unstable();
    let _ = hosts;
    Ok(DeployStats {
        outcome,
        deploy,
        events,
        failed,
        failures,
        udp_drops,
        hwm_kb,
        serve_cpu_ms,
        journaled,
        wire,
    })
}
