//! Processes inside namespaces: agents in their hosts' namespaces, `tollgate serve` in the
//! coordinator's.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tollgate_certs::Role;
use tollgate_coordinator::lab;

use super::fabric::{AGENT_PORT, Member};
use crate::fleet::{START_LIMIT, TestPki};

/// Spawns `ip netns exec NS BIN ARGS` (ip execs the binary: the child's pid is the program's),
/// and waits for the stdout line starting with `ready`; returns the rest of that line.
pub(super) async fn spawn_in(
    ns: &str,
    bin: &Path,
    args: &[&str],
    env: &[(String, String)],
    log: &Path,
    ready: &str,
) -> anyhow::Result<(Child, String)> {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns])
        .arg(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log_file))
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn()?;
    let stdout = child.stdout.take().context("child stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let rest = tokio::time::timeout(START_LIMIT, async {
        while let Some(line) = lines.next_line().await? {
            if let Some(rest) = line.strip_prefix(ready) {
                return anyhow::Ok(rest.to_string());
            }
        }
        anyhow::bail!(
            "{} exited before it was ready; see {}",
            bin.display(),
            log.display()
        )
    })
    .await
    .with_context(|| format!("{} did not start in time", bin.display()))??;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, rest))
}

/// A `tollgate-agent` in its host's namespace, on a fixed address (restarts keep it).
#[derive(Debug)]
pub struct NetAgent {
    pub name: String,
    pub ns: String,
    pub addr: SocketAddr,
    pub home: PathBuf,
    pub config: PathBuf,
    pub(super) child: Option<Child>,
}

impl NetAgent {
    pub(super) async fn start(
        pki: &TestPki,
        name: &str,
        member: &Member,
    ) -> anyhow::Result<NetAgent> {
        pki.identity(Role::Agent, Some(name))?;
        let home = pki.root().join(format!("agent-{name}"));
        std::fs::create_dir_all(home.join("markers"))?;
        let addr = SocketAddr::from((member.ip, AGENT_PORT));
        let config = home.join("agent.toml");
        std::fs::write(
            &config,
            lab::agent_toml(&pki.pki, name, addr, &home.join("state"))?,
        )?;
        std::fs::write(home.join("facts.json"), r#"{"app_version":"1.0"}"#)?;
        let mut agent = NetAgent {
            name: name.to_string(),
            ns: member.ns.clone(),
            addr,
            home,
            config,
            child: None,
        };
        agent.spawn().await?;
        Ok(agent)
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let bin = crate::bins::path("tollgate-agent")?;
        let cfg = self.config.display().to_string();
        let (child, _) = spawn_in(
            &self.ns,
            &bin,
            &["--config", &cfg],
            &[],
            &self.config.with_extension("log"),
            "tollgate-agent listening on ",
        )
        .await?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL the agent (its running scripts live on, orphaned, as after a crash of the agent
    /// alone), and wait for it to be gone.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill().await?;
        }
        Ok(())
    }

    /// Starts it again with the same config, address and state.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill().await?;
        self.spawn().await
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }
}

/// `tollgate serve` in the coordinator's namespace.
#[derive(Debug)]
pub struct NetServe {
    pub addr: SocketAddr,
    pub(super) child: Child,
}

impl NetServe {
    /// SIGKILL: no chance to clean up.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        Ok(())
    }
}
