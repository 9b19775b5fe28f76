//! `tollgate demo`: the embedded default, run on loopback with a throwaway PKI.
//!
//! This first version shows the fleet PKI being made and real mutual-TLS QUIC handshakes with
//! protocol version negotiation: the right pair talks; a wrong identity is refused, and says why.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use tollgate_certs::files::Overwrite;
use tollgate_certs::pki::Pki;
use tollgate_certs::quic::{self, QuicTimeouts};
use tollgate_certs::{Expectation, RejectionLog, Role, SpiffeId, TlsIdentity, TrustStore};
use tollgate_protocol::agent::{AgentRequest, AgentResponse, Hello, HelloAck};
use tollgate_protocol::io::{read_required, write_frame};
use tollgate_protocol::{AGENT_ALPN, FrameLimits, SUPPORTED, negotiate};

pub fn run(dir: Option<PathBuf>) -> anyhow::Result<()> {
    let dir = match dir {
        Some(d) => d,
        None => {
            std::env::temp_dir().join(format!("tollgate-demo-{}", uuid::Uuid::new_v4().simple()))
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(story(dir))
}

async fn story(dir: PathBuf) -> anyhow::Result<()> {
    let pki_dir = dir.join("pki");
    println!("== Fleet PKI");
    for line in tollgate_coordinator::pki::init(&pki_dir, "demo")? {
        println!("{line}");
    }
    let pki = Pki::open(&pki_dir)?;
    for (role, name) in [
        (Role::Coordinator, None),
        (Role::Agent, Some("web1")),
        (Role::Operator, Some("alice")),
    ] {
        let issued = pki.issue(role, name, Overwrite::Refuse)?;
        println!("issued {}", issued.id);
    }
    let load = |role, name| -> anyhow::Result<TlsIdentity> {
        let (c, k) = pki.leaf_paths(&SpiffeId::new("demo", role, name)?);
        Ok(TlsIdentity::load(&c, &k)?)
    };
    let trust = TrustStore::load(&pki.ca_cert_path(), &pki.crl_path())?;

    println!("\n== An agent on 127.0.0.2 that accepts only spiffe://demo/coordinator");
    let agent_log = RejectionLog::new();
    let server_cfg = quic::server_config(
        &load(Role::Agent, Some("web1"))?,
        &trust,
        Expectation::Exactly(SpiffeId::coordinator("demo")?),
        AGENT_ALPN,
        agent_log.clone(),
        QuicTimeouts::default(),
    )?;
    let addr: SocketAddr = "127.0.0.2:0".parse()?;
    let server = quinn::Endpoint::server(server_cfg, addr).context("binding 127.0.0.2")?;
    let addr = server.local_addr()?;
    let limits = FrameLimits::DEFAULT;
    tokio::spawn(async move {
        while let Some(incoming) = server.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                let Ok((mut send, mut recv)) = conn.accept_bi().await else {
                    return;
                };
                let answer = match read_required::<_, AgentRequest>(&mut recv, &limits).await {
                    Ok(AgentRequest::Hello(h)) => match negotiate(SUPPORTED, h.versions) {
                        Ok(version) => AgentResponse::HelloAck(HelloAck {
                            version,
                            software: "demo agent".into(),
                        }),
                        Err(_) => return,
                    },
                    _ => return,
                };
                let _ = write_frame(&mut send, &answer, &limits).await;
                let _ = send.finish();
                conn.closed().await;
            });
        }
    });
    println!("listening on {addr}");

    let web1 = SpiffeId::agent("demo", "web1")?;
    for (who, role, name) in [
        ("the coordinator", Role::Coordinator, None),
        (
            "operator alice (wrong role for an agent)",
            Role::Operator,
            Some("alice"),
        ),
    ] {
        println!("\n== {who} dials web1");
        let client_cfg = quic::client_config(
            &load(role, name)?,
            &trust,
            web1.clone(),
            AGENT_ALPN,
            RejectionLog::new(),
            QuicTimeouts::default(),
        )?;
        let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
        ep.set_default_client_config(client_cfg);
        let result = async {
            let conn = ep.connect(addr, &web1.server_name())?.await?;
            let (mut send, mut recv) = conn.open_bi().await?;
            let hello = AgentRequest::Hello(Hello {
                versions: SUPPORTED,
                software: "tollgate demo".into(),
            });
            write_frame(&mut send, &hello, &limits).await?;
            send.finish()?;
            let ack: AgentResponse = read_required(&mut recv, &limits).await?;
            conn.close(0u32.into(), b"bye");
            anyhow::Ok(ack)
        }
        .await;
        match result {
            Ok(AgentResponse::HelloAck(ack)) => {
                println!(
                    "accepted: mutual TLS 1.3, peer spiffe://demo/agent/web1, protocol v{}",
                    ack.version
                )
            }
            Ok(other) => println!("unexpected answer: {}", other.name()),
            Err(e) => println!("refused: {e:#}"),
        }
        if let Some(r) = agent_log.last() {
            println!("the agent logged why: {r}");
        }
        ep.wait_idle().await;
    }
    println!("\nartifacts: {}", dir.display());
    Ok(())
}
