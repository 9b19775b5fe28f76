//! `tollgate-sim-agents`: many simulated agents in one process, for the probe fan-out benchmark.
//!
//! ```text
//! tollgate-sim-agents --pki DIR --count N --inventory FILE [--ip 127.0.0.1] [--role web]
//!                     [--prefix sim] [--max-secs 900] [--probe-log FILE]
//! ```
//!
//! For each simulated host `simNNNN` it issues (once; later runs reuse them) a real agent
//! certificate `spiffe://FLEET/agent/simNNNN` from the fleet CA in `DIR`, binds its own QUIC
//! endpoint on `IP:0` with the same mutual-TLS server config as `tollgate-agent` (only the fleet
//! coordinator is accepted), and answers the real agent protocol with canned answers: `Hello`,
//! `Probe` (fixed facts, correct fingerprint), `Execute` (exit 0 at once, nothing runs),
//! `QueryIdempotency` (`NotFound`), `Cancel` (not found). It writes `inventory.toml` for those
//! hosts to FILE, prints `tollgate-sim-agents listening N`, and serves until its stdin closes,
//! it is signalled, or `--max-secs` pass. With `--probe-log`, every answered probe appends
//! `NAME UNIX_MS` to FILE (when the answer was written), so a benchmark can tell the wire
//! latency from the time the coordinator took to journal the answer.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use tollgate_certs::files::Overwrite;
use tollgate_certs::pki::Pki;
use tollgate_certs::quic::{self, QuicTimeouts};
use tollgate_certs::{Expectation, RejectionLog, Role, SpiffeId, TlsIdentity, TrustStore};
use tollgate_coordinator::lab::{self, LabHost};
use tollgate_protocol::agent::{
    AgentError, AgentErrorCode, AgentRequest, AgentResponse, ExecResult, ExecStatus, HelloAck,
    IdempotencyStatus, ProbeReport, fingerprint,
};
use tollgate_protocol::io::{read_frame, write_frame};
use tollgate_protocol::{AGENT_ALPN, FrameLimits, SUPPORTED, negotiate};

#[derive(Debug)]
struct Args {
    pki: PathBuf,
    count: usize,
    inventory: PathBuf,
    ip: IpAddr,
    role: String,
    prefix: String,
    max_secs: u64,
    probe_log: Option<PathBuf>,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        pki: PathBuf::new(),
        count: 0,
        inventory: PathBuf::new(),
        ip: "127.0.0.1".parse()?,
        role: "web".into(),
        prefix: "sim".into(),
        max_secs: 900,
        probe_log: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--pki" => a.pki = value.into(),
            "--count" => a.count = value.parse()?,
            "--inventory" => a.inventory = value.into(),
            "--ip" => a.ip = value.parse()?,
            "--role" => a.role = value,
            "--prefix" => a.prefix = value,
            "--max-secs" => a.max_secs = value.parse()?,
            "--probe-log" => a.probe_log = Some(value.into()),
            other => anyhow::bail!("unknown flag {other}"),
        }
    }
    anyhow::ensure!(
        a.count > 0 && !a.pki.as_os_str().is_empty() && !a.inventory.as_os_str().is_empty(),
        "usage: tollgate-sim-agents --pki DIR --count N --inventory FILE [--ip IP] [--role R] [--prefix P] [--max-secs S]"
    );
    anyhow::ensure!(
        a.ip.is_loopback(),
        "--ip must be a loopback address (127.0.0.0/8)"
    );
    Ok(a)
}

/// One simulated host: its canned probe report.
#[derive(Debug)]
struct Sim {
    name: String,
    report: ProbeReport,
    probe_log: Option<Arc<Mutex<std::fs::File>>>,
}

fn unix_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

fn report(fleet: &str, name: &str) -> ProbeReport {
    let facts: BTreeMap<String, String> = [
        ("host.name", name.to_string()),
        ("os.family", "linux".into()),
        ("os.arch", std::env::consts::ARCH.into()),
        ("agent.version", "sim".into()),
        ("agent.id", format!("spiffe://{fleet}/agent/{name}")),
        ("pwsh.present", "false".into()),
        ("probe.app_version", "1.0".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let fingerprint = fingerprint(&facts);
    ProbeReport {
        facts,
        volatile: BTreeMap::new(),
        fingerprint,
    }
}

fn answer(sim: &Sim, req: AgentRequest) -> AgentResponse {
    match req {
        AgentRequest::Hello(_) => AgentResponse::Error(AgentError {
            code: AgentErrorCode::Malformed,
            message: "Hello was already said".into(),
        }),
        AgentRequest::Probe(_) => AgentResponse::ProbeReport(sim.report.clone()),
        AgentRequest::Execute(e) => AgentResponse::ExecResult(ExecResult {
            idempotency_key: e.idempotency_key,
            status: ExecStatus::Exited { code: 0 },
            duration_ms: 0,
            stdout_truncated: false,
            stderr_truncated: false,
            replayed: false,
        }),
        AgentRequest::Cancel { .. } => AgentResponse::CancelAck { found: false },
        AgentRequest::QueryIdempotency { .. } => {
            AgentResponse::Idempotency(IdempotencyStatus::NotFound)
        }
    }
}

async fn connection(sim: Arc<Sim>, incoming: quinn::Incoming) {
    let limits = FrameLimits::DEFAULT;
    let Ok(conn) = incoming.await else { return };
    let Ok((mut send, mut recv)) = conn.accept_bi().await else {
        return;
    };
    let hello = match read_frame::<_, AgentRequest>(&mut recv, &limits).await {
        Ok(Some(AgentRequest::Hello(h))) => h,
        _ => return,
    };
    let Ok(version) = negotiate(SUPPORTED, hello.versions) else {
        return;
    };
    let ack = AgentResponse::HelloAck(HelloAck {
        version,
        software: "tollgate-sim-agents".into(),
    });
    if write_frame(&mut send, &ack, &limits).await.is_err() {
        return;
    }
    let _ = send.finish();
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        let sim = sim.clone();
        tokio::spawn(async move {
            if let Ok(Some(req)) = read_frame::<_, AgentRequest>(&mut recv, &limits).await {
                let is_probe = matches!(req, AgentRequest::Probe(_));
                let _ = write_frame(&mut send, &answer(&sim, req), &limits).await;
                let _ = send.finish();
                if let (true, Some(log)) = (is_probe, &sim.probe_log) {
                    let line = format!("{} {}\n", sim.name, unix_ms());
                    if let Ok(mut f) = log.lock() {
                        let _ = f.write_all(line.as_bytes());
                    }
                }
                let _ = tokio::time::timeout(Duration::from_secs(5), send.stopped()).await;
            }
        });
    }
}

async fn serve(endpoint: quinn::Endpoint, sim: Arc<Sim>) {
    while let Some(incoming) = endpoint.accept().await {
        tokio::spawn(connection(sim.clone(), incoming));
    }
}

fn main() -> anyhow::Result<()> {
    let args = args()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let pki = Pki::open(&args.pki)?;
    let fleet = pki.fleet().to_string();
    let trust = TrustStore::load(&pki.ca_cert_path(), &pki.crl_path())?;
    let coordinator = SpiffeId::coordinator(&fleet)?;
    let probe_log = match &args.probe_log {
        Some(p) => Some(Arc::new(Mutex::new(std::fs::File::create(p)?))),
        None => None,
    };
    let mut hosts = Vec::with_capacity(args.count);
    let mut endpoints = Vec::with_capacity(args.count);
    for i in 0..args.count {
        let name = format!("{}{i:04}", args.prefix);
        let id = SpiffeId::agent(&fleet, &name)?;
        let (cert, key) = pki.leaf_paths(&id);
        if !cert.exists() || !key.exists() {
            pki.issue(Role::Agent, Some(&name), Overwrite::Replace)?;
        }
        let identity = TlsIdentity::load(&cert, &key)?;
        let cfg = quic::server_config(
            &identity,
            &trust,
            Expectation::Exactly(coordinator.clone()),
            AGENT_ALPN,
            RejectionLog::new(),
            QuicTimeouts::default(),
        )?;
        let endpoint = quinn::Endpoint::server(cfg, SocketAddr::new(args.ip, 0))
            .with_context(|| format!("binding simulated agent {name} on {}", args.ip))?;
        let addr = endpoint.local_addr()?;
        let sim = Arc::new(Sim {
            report: report(&fleet, &name),
            name: name.clone(),
            probe_log: probe_log.clone(),
        });
        tokio::spawn(serve(endpoint.clone(), sim));
        endpoints.push(endpoint);
        hosts.push(LabHost {
            name,
            role: args.role.clone(),
            safety_class: "disposable".into(),
            addr,
        });
    }
    std::fs::write(&args.inventory, lab::inventory_toml(&fleet, &hosts))?;
    eprintln!(
        "tollgate-sim-agents: {} agents ready in {:.1} s",
        args.count,
        started.elapsed().as_secs_f64()
    );
    println!("tollgate-sim-agents listening {}", args.count);
    // Serve until stdin closes (the parent went away), a signal, or the time limit.
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        let mut stdin = std::io::stdin();
        while let Ok(n) = stdin.read(&mut buf) {
            if n == 0 {
                break;
            }
        }
        let _ = closed_tx.send(());
    });
    let stdin_closed = async {
        let _ = closed_rx.await;
    };
    tokio::select! {
        _ = stdin_closed => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = tokio::time::sleep(Duration::from_secs(args.max_secs)) => {
            eprintln!("tollgate-sim-agents: --max-secs reached, stopping");
        }
    }
    for e in &endpoints {
        e.close(0u32.into(), b"simulator stopping");
    }
    Ok(())
}
