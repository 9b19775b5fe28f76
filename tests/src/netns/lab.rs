//! The lab on the fabric: agents, `tollgate serve` and the CLI, each in its namespace.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use tokio::process::{Child, Command};
use tollgate_certs::Role;
use tollgate_coordinator::lab::{self, LabHost};

use super::fabric::{COORDINATOR_IP, COORDINATOR_PORT, Fabric, pids_in};
use super::process::{NetAgent, NetServe, spawn_in};
use super::relay::{Relay, RelayMode, UdpBinder};
use crate::evidence::{self, Markers, validate_summaries_in};
use crate::fleet::{FLEET, TestPki};
use crate::invariants::Fleet;
use crate::lab::CliOut;

/// Options of a [`NetLab`].
#[derive(Debug, Clone)]
pub struct NetLabOptions {
    /// `(name, role, safety_class)`.
    pub hosts: Vec<(String, String, String)>,
    /// Extra `coordinator.toml` lines (top level, before `[tls]`).
    pub coordinator_extra: String,
    /// Environment of `tollgate serve` (e.g. `TOLLGATE_CLOCK_OFFSET_FILE`).
    pub serve_env: Vec<(String, String)>,
    /// Hosts the inventory reaches through a [`Relay`] (needs `binder`).
    pub relayed: Vec<String>,
    pub binder: Option<UdpBinder>,
}

impl NetLabOptions {
    /// The default lab's hosts (two standard web hosts, a protected db host), a 2 s probe timeout.
    pub fn new() -> Self {
        NetLabOptions {
            hosts: crate::lab::DEFAULT_HOSTS
                .iter()
                .map(|(n, r, c)| (n.to_string(), r.to_string(), c.to_string()))
                .collect(),
            coordinator_extra: "[probe]\ntimeout = \"2s\"\n".into(),
            serve_env: Vec::new(),
            relayed: Vec::new(),
            binder: None,
        }
    }
}

impl Default for NetLabOptions {
    fn default() -> Self {
        Self::new()
    }
}

/// Agents, `tollgate serve` and the CLI on a [`Fabric`].
#[derive(Debug)]
pub struct NetLab {
    // Drop order is declaration order: processes, relays, namespaces, then the files.
    pub agents: BTreeMap<String, NetAgent>,
    pub serve: Option<NetServe>,
    pub relays: BTreeMap<String, Relay>,
    pub fabric: Fabric,
    pub pki: TestPki,
    pub config: PathBuf,
    pub serve_env: Vec<(String, String)>,
}

impl NetLab {
    pub async fn start(opts: NetLabOptions) -> anyhow::Result<NetLab> {
        let names: Vec<&str> = opts.hosts.iter().map(|(n, _, _)| n.as_str()).collect();
        let fabric = Fabric::new(&names)?;
        let pki = TestPki::new()?;
        let mut agents = BTreeMap::new();
        let mut relays = BTreeMap::new();
        let mut lab_hosts = Vec::new();
        for (name, role, class) in &opts.hosts {
            let member = fabric.member(name)?.clone();
            let agent = NetAgent::start(&pki, name, &member).await?;
            let mut addr = agent.addr;
            if opts.relayed.contains(name) {
                let bind = opts
                    .binder
                    .context("relayed hosts need NetLabOptions::binder")?;
                let ns = &fabric.coordinator.ns;
                let down = bind(ns, SocketAddr::from((COORDINATOR_IP, 0)))?;
                let up = bind(ns, SocketAddr::from((COORDINATOR_IP, 0)))?;
                let relay = Relay::start(down, up, agent.addr)?;
                addr = relay.listen;
                relays.insert(name.clone(), relay);
            }
            lab_hosts.push(LabHost {
                name: name.clone(),
                role: role.clone(),
                safety_class: class.clone(),
                addr,
            });
            agents.insert(name.clone(), agent);
        }
        for op in crate::lab::OPERATORS {
            pki.identity(Role::Operator, Some(op))?;
        }
        let root = pki.root().to_path_buf();
        let (inventory, ops, config) = (
            root.join("inventory.toml"),
            root.join("operations.toml"),
            root.join("coordinator.toml"),
        );
        std::fs::write(&inventory, lab::inventory_toml(FLEET, &lab_hosts))?;
        std::fs::write(&ops, crate::operations::gated())?;
        std::fs::write(
            &config,
            lab::coordinator_toml(
                &pki.pki,
                SocketAddr::from((COORDINATOR_IP, COORDINATOR_PORT)),
                &root.join("state"),
                &inventory,
                &ops,
                &[
                    ("alice", &["operator", "approver"]),
                    ("bob", &["approver"]),
                    ("carol", &["viewer"]),
                    ("erin", &["operator"]),
                ],
                &opts.coordinator_extra,
            )?,
        )?;
        let mut lab = NetLab {
            pki,
            agents,
            serve: None,
            config,
            serve_env: opts.serve_env,
            relays,
            fabric,
        };
        lab.start_serve().await?;
        Ok(lab)
    }

    /// Starts (or restarts) `tollgate serve` and writes the operators' client files.
    pub async fn start_serve(&mut self) -> anyhow::Result<()> {
        let bin = crate::bins::path("tollgate")?;
        let cfg = self.config.display().to_string();
        let (child, rest) = spawn_in(
            &self.fabric.coordinator.ns,
            &bin,
            &["serve", "--config", &cfg],
            &self.serve_env,
            &self.config.with_extension("log"),
            "tollgate serve listening on ",
        )
        .await?;
        let addr: SocketAddr = rest
            .split_whitespace()
            .next()
            .context("serve address")?
            .parse()?;
        for op in crate::lab::OPERATORS {
            std::fs::write(
                self.client_file(op),
                lab::client_toml(&self.pki.pki, op, addr)?,
            )?;
        }
        self.serve = Some(NetServe { addr, child });
        Ok(())
    }

    /// SIGKILLs `tollgate serve`.
    pub async fn kill_serve(&mut self) -> anyhow::Result<()> {
        if let Some(mut s) = self.serve.take() {
            s.kill().await?;
        }
        Ok(())
    }

    pub fn agent_mut(&mut self, host: &str) -> anyhow::Result<&mut NetAgent> {
        self.agents
            .get_mut(host)
            .with_context(|| format!("no agent {host}"))
    }

    /// Power cut: SIGKILL the agent and every script it runs.
    pub async fn crash_host(&mut self, host: &str) -> anyhow::Result<()> {
        self.fabric.kill_everything_in(host)?;
        self.agent_mut(host)?.kill().await
    }

    pub fn client_file(&self, who: &str) -> PathBuf {
        self.pki.root().join(format!("client-{who}.toml"))
    }

    pub fn runs_dir(&self) -> PathBuf {
        self.pki.root().join("state").join("runs")
    }

    pub fn home(&self, host: &str) -> PathBuf {
        self.agents
            .get(host)
            .map(|a| a.home.clone())
            .unwrap_or_default()
    }

    pub fn host_names(&self) -> Vec<String> {
        self.agents.keys().cloned().collect()
    }

    /// Holds `step` (or `"probe"`) on `host` once it begins.
    pub fn arm_gate(&self, host: &str, step: &str) -> anyhow::Result<()> {
        let _ = std::fs::remove_file(self.home(host).join(format!("started-{step}")));
        Ok(std::fs::write(
            self.home(host).join(format!("gate-{step}")),
            "",
        )?)
    }

    pub fn release_gate(&self, host: &str, step: &str) -> anyhow::Result<()> {
        match std::fs::remove_file(self.home(host).join(format!("gate-{step}"))) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    pub fn started(&self, host: &str, step: &str) -> bool {
        self.home(host).join(format!("started-{step}")).exists()
    }

    /// Waits (bounded) until `step` is held at its gate on `host`.
    pub async fn wait_started(
        &self,
        host: &str,
        step: &str,
        limit: Duration,
    ) -> anyhow::Result<()> {
        let f = self.home(host).join(format!("started-{step}"));
        anyhow::ensure!(
            crate::proc::eventually(limit, || f.exists()).await,
            "{step} never started on {host} within {limit:?}"
        );
        Ok(())
    }

    pub fn set_fact(&self, host: &str, json: &str) -> anyhow::Result<()> {
        Ok(std::fs::write(self.home(host).join("facts.json"), json)?)
    }

    /// Completed executions of `step` on `host` (`markers/STEP`).
    pub fn ran(&self, host: &str, step: &str) -> usize {
        evidence::finished(&self.home(host), step)
    }

    /// Executions of `step` on `host` that began (`markers/STEP.begun`).
    pub fn begun(&self, host: &str, step: &str) -> usize {
        evidence::begun(&self.home(host), step)
    }

    pub fn markers(&self) -> Markers {
        Markers::read(
            self.agents
                .iter()
                .map(|(n, a)| (n.clone(), a.home.clone()))
                .collect(),
        )
    }

    /// Cuts a host's link, or `"coordinator"`'s.
    pub fn cut(&self, who: &str) -> anyhow::Result<()> {
        self.fabric.cut(who)
    }

    pub fn heal(&self, who: &str) -> anyhow::Result<()> {
        self.fabric.heal(who)?;
        self.fabric.netem_clear(who)?;
        if let Some(r) = self.relays.get(who) {
            r.set(RelayMode::Pass);
        }
        Ok(())
    }

    /// Delays traffic towards `host` by `delay`: `tc netem` when the kernel has it, else the
    /// host's relay. Returns which was used.
    pub fn delay(&self, host: &str, delay: Duration) -> anyhow::Result<&'static str> {
        if self.fabric.netem_available() {
            self.fabric.netem_delay(host, delay)?;
            return Ok("tc netem");
        }
        let relay = self.relays.get(host).with_context(|| {
            format!("this kernel has no sch_netem and {host} is not behind a relay (NetLabOptions::relayed)")
        })?;
        relay.set(RelayMode::Delay(delay));
        Ok("userspace relay (no sch_netem in this kernel)")
    }

    fn cli_command(&self, who: &str, args: &[&str]) -> anyhow::Result<Command> {
        let bin = crate::bins::path("tollgate")?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.fabric.coordinator.ns])
            .arg(bin)
            .args(args)
            .arg("--json")
            .env("TOLLGATE_CLIENT", self.client_file(who))
            .stdin(Stdio::null())
            .kill_on_drop(true);
        Ok(cmd)
    }

    /// Runs `tollgate ARGS --json` as `who`, inside the coordinator's namespace.
    pub async fn cli(&self, who: &str, args: &[&str]) -> anyhow::Result<CliOut> {
        let mut cmd = self.cli_command(who, args)?;
        let out = tokio::time::timeout(Duration::from_secs(150), cmd.output())
            .await
            .with_context(|| format!("`tollgate {}` did not answer in 150 s", args.join(" ")))??;
        Ok(CliOut::from(out))
    }

    /// Starts `tollgate ARGS --json` as `who` in the background (to inject faults while it runs);
    /// the handle answers within 150 s or with an error.
    pub fn spawn_cli(
        &self,
        who: &str,
        args: &[&str],
    ) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<CliOut>>> {
        let mut cmd = self.cli_command(who, args)?;
        let what = args.join(" ");
        Ok(tokio::spawn(async move {
            let out = tokio::time::timeout(Duration::from_secs(150), cmd.output())
                .await
                .with_context(|| format!("`tollgate {what}` did not answer in 150 s"))??;
            Ok(CliOut::from(out))
        }))
    }

    /// Full teardown of `hosts` up to a token ([`crate::invariants::approved_teardown`]).
    pub async fn approved_teardown(&self, hosts: &str) -> anyhow::Result<(String, String, String)> {
        crate::invariants::approved_teardown(self, hosts).await
    }

    /// Validates every `summary.json` against the published schema; returns how many.
    pub fn validate_summaries(&self) -> anyhow::Result<usize> {
        validate_summaries_in(&self.runs_dir())
    }
}

impl Fleet for NetLab {
    fn run_cli(
        &self,
        who: &str,
        args: &[&str],
    ) -> impl std::future::Future<Output = anyhow::Result<CliOut>> + Send {
        let cmd = self.cli_command(who, args);
        let what = args.join(" ");
        async move {
            let out = tokio::time::timeout(Duration::from_secs(150), cmd?.output())
                .await
                .with_context(|| format!("`tollgate {what}` did not answer in 150 s"))??;
            Ok(CliOut::from(out))
        }
    }

    fn runs_directory(&self) -> PathBuf {
        self.runs_dir()
    }

    fn homes(&self) -> BTreeMap<String, PathBuf> {
        self.agents
            .iter()
            .map(|(n, a)| (n.clone(), a.home.clone()))
            .collect()
    }
}

/// Waits until no script runs on any host of `lab` (only the agent itself is left in each host's
/// namespace), so marker counts are final.
pub async fn quiesce(lab: &NetLab, limit: Duration) -> anyhow::Result<()> {
    let namespaces: Vec<String> = lab.fabric.hosts.values().map(|m| m.ns.clone()).collect();
    let agents: Vec<i32> = lab
        .agents
        .values()
        .filter_map(|a| a.child.as_ref().and_then(Child::id))
        .filter_map(|p| i32::try_from(p).ok())
        .collect();
    let quiet = crate::proc::eventually(limit, || {
        namespaces
            .iter()
            .all(|ns| pids_in(ns).iter().all(|p| agents.contains(p)))
    })
    .await;
    anyhow::ensure!(quiet, "scripts still running on the hosts after {limit:?}");
    Ok(())
}
