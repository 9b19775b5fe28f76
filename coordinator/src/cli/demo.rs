//! `tollgate demo`: the embedded default. A throwaway PKI, three real `tollgate-agent` processes
//! on 127.0.0.2-4, an in-process coordinator on 127.0.0.1, and the whole story told as an
//! operator would live it: quick deploy, escalation, approval, full teardown, the two-person
//! rule, and a stale plan blocked at the barrier. Where `pwsh` is on PATH a fourth host, `ops1`,
//! is reached through PowerShell (the `local` transport) and deployed with PowerShell steps; the
//! demo says which `pwsh` it used, or why there is none. Artifacts stay on disk.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tollgate_certs::Role;
use tollgate_certs::files::Overwrite;
use tollgate_certs::pki::Pki;
use tollgate_coordinator::client::{Client, ClientConfig};
use tollgate_coordinator::lab::{self, LabHost};
use tollgate_coordinator::render;
use tollgate_coordinator::runtime::clock::Clock;
use tollgate_coordinator::service;
use tollgate_coordinator::transport::pwsh::resolve_program;
use tollgate_protocol::ctl::{CtlRequest, CtlResponse, OperationIntent};
use tollgate_protocol::outcome::{Outcome, RunReport};
use tollgate_protocol::{Action, Mode};
use uuid::Uuid;

const FLEET: &str = "demo";

pub fn run(dir: Option<PathBuf>) -> anyhow::Result<()> {
    let dir = match dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("tollgate-demo-{}", Uuid::new_v4().simple())),
    };
    if dir.exists() && std::fs::read_dir(&dir)?.next().is_some() {
        bail!("{} is not empty; choose a new --dir", dir.display());
    }
    std::fs::create_dir_all(&dir)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    actix::System::with_tokio_rt(move || rt).block_on(story(dir))
}

fn agent_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let name = if cfg!(windows) {
        "tollgate-agent.exe"
    } else {
        "tollgate-agent"
    };
    let p = exe
        .parent()
        .map(|d| d.join(name))
        .context("no directory for the tollgate executable")?;
    if !p.is_file() {
        bail!(
            "{} not found: build both binaries with `cargo build --release --bins`",
            p.display()
        );
    }
    Ok(p)
}

/// Starts one agent and waits for its "listening" line.
async fn start_agent(bin: &Path, config: &Path, log: &Path) -> anyhow::Result<(Child, SocketAddr)> {
    let log_file = std::fs::File::create(log)?;
    let mut child = Command::new(bin)
        .arg("--config")
        .arg(config)
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log_file))
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let stdout = child.stdout.take().context("agent stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let addr = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await? {
            if let Some(rest) = line.strip_prefix("tollgate-agent listening on ") {
                return rest
                    .split_whitespace()
                    .next()
                    .context("address")?
                    .parse::<SocketAddr>()
                    .map_err(Into::into);
            }
        }
        bail!("agent exited early; see {}", log.display())
    })
    .await
    .context("agent did not start in 20 s")??;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, addr))
}

fn say(title: &str) {
    println!("\n━━ {title}");
}

fn cli(line: &str) {
    println!("$ {line}");
}

fn indent(text: &str) {
    for l in text.lines() {
        println!("  {l}");
    }
}

async fn submit(
    c: &Client,
    action: Action,
    mode: Mode,
    hosts: &[&str],
    run_id: Uuid,
) -> anyhow::Result<RunReport> {
    let req = CtlRequest::Submit(OperationIntent {
        action,
        requested_mode: mode,
        target_hosts: hosts.iter().map(|h| h.to_string()).collect(),
        run_id,
        requestor: String::new(),
        shadow: false,
    });
    report_of(
        c.stream(req, |p| println!("    · {}", render::progress_line(p)))
            .await?,
    )
}

fn report_of(resp: CtlResponse) -> anyhow::Result<RunReport> {
    match resp {
        CtlResponse::Run(r) => Ok(r),
        CtlResponse::Error(e) => bail!("refused: {}", e.message),
        other => bail!("unexpected answer {other:?}"),
    }
}

fn app_exists(root: &Path, host: &str) -> bool {
    root.join("hosts").join(host).join("app").exists()
}

async fn story(dir: PathBuf) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    println!(
        "Tollgate demo: a throwaway fleet on this machine, loopback only. Everything is real:"
    );
    println!("mutual-TLS QUIC, agent processes, fsynced hash-chained journals, Ed25519 tokens.");

    say("1. Fleet PKI (tollgate certs init / issue)");
    let pki_dir = dir.join("pki");
    let pki = Pki::init(&pki_dir, FLEET)?;
    pki.issue(Role::Coordinator, None, Overwrite::Refuse)?;
    let hosts_spec = [
        ("web1", "web", "standard", 2u8),
        ("web2", "web", "standard", 3),
        ("db1", "db", "protected", 4),
    ];
    for (name, ..) in hosts_spec {
        pki.issue(Role::Agent, Some(name), Overwrite::Refuse)?;
    }
    for op in ["alice", "bob", "erin"] {
        pki.issue(Role::Operator, Some(op), Overwrite::Refuse)?;
    }
    println!(
        "  CA, CRL, coordinator, agents web1 web2 db1, operators erin (operator), alice (operator+approver) and bob (approver)"
    );
    println!("  in {}", pki_dir.display());

    say("2. Three agents on 127.0.0.2-4 (tollgate-agent --config agent.toml)");
    let bin = agent_binary()?;
    let mut agents = Vec::new();
    let mut lab_hosts = Vec::new();
    for (name, role, class, octet) in hosts_spec {
        let home = dir.join("hosts").join(name);
        std::fs::create_dir_all(&home)?;
        std::fs::write(
            home.join("facts.json"),
            r#"{"app_version":"1.0","maintenance":"off"}"#,
        )?;
        let listen: SocketAddr = format!("127.0.0.{octet}:0").parse()?;
        let cfg = home.join("agent.toml");
        std::fs::write(
            &cfg,
            lab::agent_toml(&pki, name, listen, &home.join("agent-state"))?,
        )?;
        let (child, addr) = start_agent(&bin, &cfg, &home.join("agent.log")).await?;
        println!("  {name:<5} {class:<10} listening on {addr}");
        agents.push(child);
        lab_hosts.push(LabHost {
            name: name.into(),
            role: role.into(),
            safety_class: class.into(),
            addr,
        });
    }

    let ps_home = dir.join("hosts").join("ops1");
    let pwsh = match resolve_program(Path::new("pwsh")) {
        Ok(p) => {
            std::fs::create_dir_all(&ps_home)?;
            std::fs::write(ps_home.join("facts.json"), r#"{"app_version":"1.0"}"#)?;
            println!(
                "  ops1  standard   reached through PowerShell: transport `local` (a supervised session host on {})",
                p.display()
            );
            Some(p)
        }
        Err(e) => {
            println!("  (no PowerShell host in this demo: {e})");
            None
        }
    };

    say("3. The coordinator (tollgate serve --config coordinator.toml), in-process");
    let inventory = dir.join("inventory.toml");
    let operations = dir.join("operations.toml");
    let coordinator_toml = dir.join("coordinator.toml");
    let mut inventory_text = lab::inventory_toml(FLEET, &lab_hosts);
    if pwsh.is_some() {
        inventory_text.push_str(
            "[[hosts]]\nname = \"ops1\"\nrole = \"ops\"\nsafety_class = \"standard\"\ntransport.local = {}\n",
        );
    }
    std::fs::write(&inventory, inventory_text)?;
    std::fs::write(
        &operations,
        lab::demo_operations_toml(pwsh.as_ref().map(|_| ps_home.as_path())),
    )?;
    std::fs::write(
        &coordinator_toml,
        lab::coordinator_toml(
            &pki,
            "127.0.0.1:0".parse()?,
            &dir.join("state"),
            &inventory,
            &operations,
            &[
                ("alice", &["operator", "approver"]),
                ("bob", &["approver"]),
                ("erin", &["operator"]),
            ],
            &pwsh
                .as_ref()
                .map(|p| format!("pwsh = {:?}\n", p.display().to_string()))
                .unwrap_or_default(),
        )?,
    )?;
    let running = service::start(service::load(&coordinator_toml)?, Clock::system()).await?;
    println!(
        "  control port {} ; journals in {}",
        running.ctl_addr,
        running.runs_dir.display()
    );
    for op in ["alice", "bob", "erin"] {
        std::fs::write(
            dir.join(format!("client-{op}.toml")),
            lab::client_toml(&pki, op, running.ctl_addr)?,
        )?;
    }
    let alice = Client::connect(&ClientConfig::load(&dir.join("client-alice.toml"))?).await?;
    let bob = Client::connect(&ClientConfig::load(&dir.join("client-bob.toml"))?).await?;
    let erin = Client::connect(&ClientConfig::load(&dir.join("client-erin.toml"))?).await?;
    let as_alice = format!(
        "TOLLGATE_CLIENT={}",
        dir.join("client-alice.toml").display()
    );
    let as_erin = format!("TOLLGATE_CLIENT={}", dir.join("client-erin.toml").display());

    say("4. Quick deploy to every host");
    cli(&format!("{as_alice} tollgate deploy"));
    let r = submit(&alice, Action::Deploy, Mode::Quick, &[], Uuid::new_v4()).await?;
    indent(&render::report(&r));

    say(
        "5. Erin asks for a quick teardown of web1,web2: quick mode never destroys, so it escalates",
    );
    let teardown_id = Uuid::new_v4();
    cli(&format!("{as_erin} tollgate teardown --hosts web1,web2"));
    let r = submit(
        &erin,
        Action::Teardown,
        Mode::Quick,
        &["web1", "web2"],
        teardown_id,
    )
    .await?;
    indent(&render::report(&r));
    let Outcome::EscalationRequired { next_command, .. } = &r.outcome else {
        bail!("expected an escalation, got {:?}", r.outcome)
    };

    say("6. Running the printed command: full mode needs a confirmation token for this exact plan");
    cli(&format!("{as_erin} {next_command}"));
    let r = submit(
        &erin,
        Action::Teardown,
        Mode::Full,
        &["web1", "web2"],
        teardown_id,
    )
    .await?;
    indent(&render::report(&r));
    let Outcome::ConfirmationRequired { operation_hash, .. } = &r.outcome else {
        bail!("expected ConfirmationRequired, got {:?}", r.outcome)
    };

    say(
        "7. Alice approves the plan (erin asked, so she may not approve it herself); the token is bound to run, hosts, plan hash and approver",
    );
    cli(&format!(
        "{as_alice} tollgate approve {teardown_id} --operation-hash {operation_hash}"
    ));
    let token = match alice
        .call(CtlRequest::Approve {
            run_id: teardown_id,
            operation_hash: operation_hash.clone(),
        })
        .await?
    {
        CtlResponse::Approved(a) => {
            indent(&render::approval(&a));
            a.token
        }
        other => bail!("approval failed: {other:?}"),
    };

    say(
        "8. Execute: barrier (containment, fresh re-probe, policy, token) before the destructive phase",
    );
    cli(&format!(
        "{as_erin} tollgate execute {teardown_id} --token <token>"
    ));
    let r = report_of(
        erin.stream(
            CtlRequest::Execute {
                run_id: teardown_id,
                token: token.clone(),
            },
            |p| println!("    · {}", render::progress_line(p)),
        )
        .await?,
    )?;
    indent(&render::report(&r));
    println!(
        "  app removed on web1: {}, web2: {}; db1 untouched: {}",
        !app_exists(&dir, "web1"),
        !app_exists(&dir, "web2"),
        app_exists(&dir, "db1")
    );

    say("9. The same token again: single use, so it is refused");
    cli(&format!(
        "{as_erin} tollgate execute {teardown_id} --token <the same token>"
    ));
    let r = report_of(
        erin.call(CtlRequest::Execute {
            run_id: teardown_id,
            token,
        })
        .await?,
    )?;
    indent(&render::report(&r));

    say(
        "10. db1 is protected: its teardown needs two distinct approvers, neither of them the requester",
    );
    let db_id = Uuid::new_v4();
    cli(&format!(
        "{as_erin} tollgate teardown --mode full --hosts db1"
    ));
    let r = submit(&erin, Action::Teardown, Mode::Full, &["db1"], db_id).await?;
    indent(&render::report(&r));
    let Outcome::ConfirmationRequired { operation_hash, .. } = &r.outcome else {
        bail!("expected ConfirmationRequired, got {:?}", r.outcome)
    };
    cli(&format!(
        "{as_alice} tollgate approve {db_id} --operation-hash {operation_hash}"
    ));
    match alice
        .call(CtlRequest::Approve {
            run_id: db_id,
            operation_hash: operation_hash.clone(),
        })
        .await?
    {
        CtlResponse::ApprovalRecorded {
            approvers,
            required,
            ..
        } => println!(
            "  approval recorded ({} of {required}): another approver is needed",
            approvers.len()
        ),
        other => bail!("expected a pending approval, got {other:?}"),
    }
    cli(&format!(
        "TOLLGATE_CLIENT={} tollgate approve {db_id} --operation-hash {operation_hash}",
        dir.join("client-bob.toml").display()
    ));
    let token = match bob
        .call(CtlRequest::Approve {
            run_id: db_id,
            operation_hash: operation_hash.clone(),
        })
        .await?
    {
        CtlResponse::Approved(a) => {
            println!("  token issued, approved by two people");
            a.token
        }
        other => bail!("approval failed: {other:?}"),
    };

    say(
        "11. Before execution, someone hotfixes db1 by hand: its facts drift from the approved plan",
    );
    std::fs::write(
        dir.join("hosts/db1/facts.json"),
        r#"{"app_version":"1.1-hotfix","maintenance":"off"}"#,
    )?;
    println!("  hosts/db1/facts.json: app_version 1.0 -> 1.1-hotfix");
    cli(&format!(
        "{as_erin} tollgate execute {db_id} --token <token>"
    ));
    let r = report_of(
        erin.stream(
            CtlRequest::Execute {
                run_id: db_id,
                token,
            },
            |p| println!("    · {}", render::progress_line(p)),
        )
        .await?,
    )?;
    indent(&render::report(&r));
    println!("  db1 app still there: {}", app_exists(&dir, "db1"));

    say("12. Why? (tollgate explain)");
    cli(&format!("{as_alice} tollgate explain {db_id}"));
    if let CtlResponse::Explanation { lines } =
        alice.call(CtlRequest::Explain { run_id: db_id }).await?
    {
        for l in lines {
            println!("  {l}");
        }
    }

    say(
        "13. Every journal is intact (tollgate runs verify), and the fleet as the coordinator sees it",
    );
    if let CtlResponse::Runs { runs } = alice.call(CtlRequest::RunsList).await? {
        for run in &runs {
            if let CtlResponse::Verified(v) = alice
                .call(CtlRequest::RunsVerify { run_id: run.run_id })
                .await?
            {
                print!("  {}", render::verify(&v));
            }
        }
    }
    if let CtlResponse::Status { hosts } = alice.call(CtlRequest::Status).await? {
        indent(&render::status(&hosts));
    }

    alice.close();
    bob.close();
    erin.close();
    running.endpoint.close(0u32.into(), b"demo over");
    for mut a in agents {
        let _ = a.start_kill();
        let _ = a.wait().await;
    }
    println!(
        "\nDone in {:.1} s. Artifacts (PKI, configs, agent logs, runs/*/timeline.jsonl and summary.json):",
        started.elapsed().as_secs_f64()
    );
    println!("  {}", dir.display());
    println!(
        "The coordinator and agents stopped with the demo. Each run's story is in state/runs/RUN_ID/:"
    );
    println!(
        "timeline.jsonl (hash-chained decisions) and summary.json (outcome, decisions, signed anchor)."
    );
    Ok(())
}
