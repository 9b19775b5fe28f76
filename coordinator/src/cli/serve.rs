//! `tollgate serve --config coordinator.toml`.

use std::io::Write;
use std::path::Path;

use tollgate_coordinator::runtime::clock::Clock;
use tollgate_coordinator::service;

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

pub fn run(config: &Path) -> anyhow::Result<()> {
    let loaded = service::load(config)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let system = actix::System::with_tokio_rt(move || rt);
    system.block_on(async move {
        let running = service::start(loaded, Clock::from_env()).await?;
        println!(
            "tollgate serve listening on {} (runs in {})",
            running.ctl_addr,
            running.runs_dir.display()
        );
        let _ = std::io::stdout().flush();
        shutdown_signal().await;
        running
            .endpoint
            .close(0u32.into(), b"coordinator shutting down");
        anyhow::Ok(())
    })
}
