//! `tollgate-agent --config agent.toml`

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "tollgate-agent",
    version,
    about = "Tollgate host agent (QUIC + mutual TLS)"
)]
struct Args {
    /// Path of agent.toml.
    #[arg(long)]
    config: PathBuf,
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = int.recv() => {},
                }
            }
            _ => std::future::pending::<()>().await,
        }
    }
    #[cfg(not(unix))]
    {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let cfg = tollgate_agent::config::load(&args.config)?;
    // One thread: the agent waits on processes and sockets; it does not compute.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let listening = tollgate_agent::server::bind(&cfg)?;
        let shells = listening.learn_shells().await;
        tracing::info!(?shells, "shell facts learned");
        // Tests and supervisors wait for this line.
        println!(
            "tollgate-agent listening on {} as {}",
            listening.addr, listening.id
        );
        let _ = std::io::stdout().flush();
        listening.serve(shutdown_signal()).await?;
        println!("tollgate-agent stopped");
        anyhow::Ok(())
    })
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TOLLGATE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour only on a terminal: logs redirected to a file stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tollgate-agent: {e:#}");
            ExitCode::from(2)
        }
    }
}
