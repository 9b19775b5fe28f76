//! A throwaway fleet: PKI, agent processes, and a coordinator-side connector.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tollgate_certs::files::Overwrite;
use tollgate_certs::pki::Pki;
use tollgate_certs::{Role, SpiffeId, TlsIdentity, TrustStore};
use tollgate_coordinator::transport::agent::{AgentConnector, AgentLink};

/// How long an agent may take to print its "listening" line.
pub const START_LIMIT: Duration = Duration::from_secs(30);
pub const FLEET: &str = "test";

/// A temp directory holding a fleet PKI.
#[derive(Debug)]
pub struct TestPki {
    pub dir: tempfile::TempDir,
    pub pki: Pki,
}

impl TestPki {
    pub fn new() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let pki = Pki::init(&dir.path().join("pki"), FLEET)?;
        pki.issue(Role::Coordinator, None, Overwrite::Refuse)?;
        Ok(TestPki { dir, pki })
    }

    /// Issues (once) and loads an identity.
    pub fn identity(&self, role: Role, name: Option<&str>) -> anyhow::Result<TlsIdentity> {
        let id = SpiffeId::new(FLEET, role, name)?;
        let (cert, key) = self.pki.leaf_paths(&id);
        if !cert.exists() {
            self.pki.issue(role, name, Overwrite::Refuse)?;
        }
        Ok(TlsIdentity::load(&cert, &key)?)
    }

    pub fn trust(&self) -> anyhow::Result<TrustStore> {
        Ok(TrustStore::load(
            &self.pki.ca_cert_path(),
            &self.pki.crl_path(),
        )?)
    }

    /// A connector holding the coordinator identity.
    pub fn coordinator(&self) -> anyhow::Result<AgentConnector> {
        self.connector_as(Role::Coordinator, None)
    }

    /// A connector holding any identity (to test refusals).
    pub fn connector_as(&self, role: Role, name: Option<&str>) -> anyhow::Result<AgentConnector> {
        let id = Arc::new(self.identity(role, name)?);
        Ok(AgentConnector::new(
            id,
            self.trust()?,
            "127.0.0.1:0".parse()?,
        )?)
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }
}

/// Settings of one agent process.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub name: String,
    /// 127.0.0.N
    pub ip: Ipv4Addr,
    pub extra_toml: String,
}

impl AgentOptions {
    pub fn new(name: &str, last_octet: u8) -> Self {
        AgentOptions {
            name: name.to_string(),
            ip: Ipv4Addr::new(127, 0, 0, last_octet),
            extra_toml: String::new(),
        }
    }

    pub fn with(mut self, toml_line: &str) -> Self {
        self.extra_toml.push_str(toml_line);
        self.extra_toml.push('\n');
        self
    }
}

/// A running `tollgate-agent` process.
#[derive(Debug)]
pub struct AgentProcess {
    pub id: SpiffeId,
    pub addr: SocketAddr,
    pub config: PathBuf,
    pub state_dir: PathBuf,
    child: Child,
}

impl AgentProcess {
    /// Writes the agent's config (port 0 the first time) and starts it.
    pub async fn start(pki: &TestPki, opts: &AgentOptions) -> anyhow::Result<Self> {
        pki.identity(Role::Agent, Some(&opts.name))?;
        let home = pki.root().join(format!("agent-{}", opts.name));
        std::fs::create_dir_all(&home)?;
        let id = SpiffeId::agent(FLEET, &opts.name)?;
        let (cert, key) = pki.pki.leaf_paths(&id);
        let config = home.join("agent.toml");
        let state_dir = home.join("state");
        let text = format!(
            "listen = \"{ip}:0\"\nstate_dir = {state:?}\ncoordinator_id = \"spiffe://{FLEET}/coordinator\"\n{extra}\n[tls]\nca = {ca:?}\ncert = {cert:?}\nkey = {key:?}\ncrl = {crl:?}\n",
            ip = opts.ip,
            state = state_dir,
            extra = opts.extra_toml,
            ca = pki.pki.ca_cert_path(),
            crl = pki.pki.crl_path(),
        );
        std::fs::write(&config, text)?;
        Self::spawn(id, config, state_dir).await
    }

    async fn spawn(id: SpiffeId, config: PathBuf, state_dir: PathBuf) -> anyhow::Result<Self> {
        let bin = crate::bins::path("tollgate-agent")?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(config.with_extension("log"))?;
        let mut child = Command::new(bin)
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().context("agent stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let wait_ready = async {
            while let Some(line) = lines.next_line().await? {
                if let Some(rest) = line.strip_prefix("tollgate-agent listening on ") {
                    let addr = rest
                        .split_whitespace()
                        .next()
                        .context("address")?
                        .parse::<SocketAddr>()?;
                    return anyhow::Ok(addr);
                }
            }
            anyhow::bail!(
                "agent exited before listening; see {}",
                config.with_extension("log").display()
            )
        };
        let addr = tokio::time::timeout(START_LIMIT, wait_ready)
            .await
            .context("agent did not start in time")??;
        // Keep draining stdout so the agent never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        // Pin the port for restarts.
        let text = std::fs::read_to_string(&config)?;
        let pinned = text
            .lines()
            .map(|l| {
                if l.starts_with("listen = ") {
                    format!("listen = \"{addr}\"")
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(&config, pinned)?;
        Ok(AgentProcess {
            id,
            addr,
            config,
            state_dir,
            child,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// SIGKILL, and wait for the process to be gone.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        Ok(())
    }

    /// SIGTERM (graceful shutdown), and wait for the exit status.
    #[cfg(unix)]
    pub async fn terminate(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        if let Some(pid) = self.child.id() {
            kill(Pid::from_raw(i32::try_from(pid)?), Signal::SIGTERM)?;
        }
        Ok(tokio::time::timeout(Duration::from_secs(60), self.child.wait()).await??)
    }

    /// Starts the agent again with the same config, address and state.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        let fresh =
            Self::spawn(self.id.clone(), self.config.clone(), self.state_dir.clone()).await?;
        *self = fresh;
        Ok(())
    }

    /// Connects as whoever `connector` holds.
    pub async fn connect(&self, connector: &AgentConnector) -> anyhow::Result<AgentLink> {
        Ok(connector
            .connect(self.addr, &self.id, Duration::from_secs(10))
            .await?)
    }
}
