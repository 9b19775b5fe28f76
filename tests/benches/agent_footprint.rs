//! The agent's footprint: stripped binary size (`strip` on a copy of the built
//! `tollgate-agent`) and idle RSS (a real agent started with a config, `VmRSS` read once it
//! printed its "listening" line and again after it sat idle for a second, the larger reported).
//! Asserts nothing. Lines starting `RESULT ` are for `bench/run.sh`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use anyhow::Context;
use tollgate_tests::bins;
use tollgate_tests::fleet::{AgentOptions, AgentProcess, TestPki};

fn vm_rss_kb(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    if let Err(e) = rt.block_on(run()) {
        eprintln!("agent_footprint: FAILED: {e:#}");
        std::process::exit(1);
    }
}

async fn run() -> anyhow::Result<()> {
    let bin = bins::path("tollgate-agent")?;
    let built = std::fs::metadata(&bin)?.len();
    let tmp = tempfile::tempdir()?;
    let copy = tmp.path().join("tollgate-agent");
    std::fs::copy(&bin, &copy)?;
    let status = std::process::Command::new("strip")
        .arg(&copy)
        .status()
        .context("running strip")?;
    anyhow::ensure!(status.success(), "strip failed: {status}");
    let stripped = std::fs::metadata(&copy)?.len();

    let pki = TestPki::new()?;
    let agent = AgentProcess::start(&pki, &AgentOptions::new("footprint", 10)).await?;
    let pid = agent.pid().context("agent pid")?;
    let at_ready = vm_rss_kb(pid).context("VmRSS")?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = vm_rss_kb(pid).context("VmRSS")?.max(at_ready);
    drop(agent);

    let mb = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!(
        "agent: binary {:.2} MB as built, {:.2} MB stripped; idle RSS {:.1} MB (at ready {:.1} MB)",
        mb(built),
        mb(stripped),
        idle as f64 / 1024.0,
        at_ready as f64 / 1024.0
    );
    println!("RESULT agent_binary_mb={:.2}", mb(stripped));
    println!("RESULT agent_idle_rss_mb={:.1}", idle as f64 / 1024.0);
    Ok(())
}
