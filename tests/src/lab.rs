//! A lab fleet: real `tollgate-agent` processes, a real `tollgate serve` process, and the
//! `tollgate` CLI run as an operator would run it (with `TOLLGATE_CLIENT` and `--json`).
//!
//! Every step of the lab's operations appends a line to `<host home>/markers/<step>`, so a
//! test can count exactly how many times each step ran on each host.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tollgate_certs::Role;
use tollgate_coordinator::lab::{self, LabHost};

use crate::fleet::{AgentOptions, AgentProcess, FLEET, START_LIMIT, TestPki};

/// A running `tollgate serve`.
#[derive(Debug)]
pub struct ServeProcess {
    pub addr: std::net::SocketAddr,
    child: Child,
}

impl ServeProcess {
    pub async fn start(config: &Path, env: &[(&str, String)]) -> anyhow::Result<Self> {
        let bin = crate::bins::path("tollgate")?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(config.with_extension("log"))?;
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .arg("--config")
            .arg(config)
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn()?;
        let stdout = child.stdout.take().context("serve stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let addr = tokio::time::timeout(START_LIMIT, async {
            while let Some(line) = lines.next_line().await? {
                if let Some(rest) = line.strip_prefix("tollgate serve listening on ") {
                    return Ok(rest.split_whitespace().next().context("address")?.parse()?);
                }
            }
            anyhow::bail!(
                "tollgate serve exited; see {}",
                config.with_extension("log").display()
            )
        })
        .await
        .context("tollgate serve did not start in time")??;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(ServeProcess { addr, child })
    }

    /// SIGKILL: no chance to clean up.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        Ok(())
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Sends SIGHUP (re-read the CRL).
    #[cfg(unix)]
    pub fn hangup(&self) -> anyhow::Result<()> {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        let pid = self.pid().context("serve has exited")?;
        kill(Pid::from_raw(i32::try_from(pid)?), Signal::SIGHUP)?;
        Ok(())
    }
}

/// What one CLI invocation did.
#[derive(Debug)]
pub struct CliOut {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<std::process::Output> for CliOut {
    /// A finished CLI process: its status (-1 when killed by a signal) and its output as text.
    fn from(out: std::process::Output) -> Self {
        CliOut {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

impl CliOut {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or(serde_json::Value::Null)
    }

    /// The outcome kind of a run answer (`"Completed"`, `"PolicyBlocked"`, ...).
    pub fn outcome(&self) -> String {
        match &self.json()["outcome"] {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Object(m) => m.keys().next().cloned().unwrap_or_default(),
            _ => String::new(),
        }
    }

    pub fn reason(&self) -> String {
        self.json()["reason"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

/// A fleet of agents with a coordinator.
#[derive(Debug)]
pub struct Lab {
    pub pki: TestPki,
    pub agents: BTreeMap<String, AgentProcess>,
    pub serve: Option<ServeProcess>,
    pub config: PathBuf,
    pub serve_env: Vec<(&'static str, String)>,
    /// The real sshd targets of [`Lab::start_ssh`].
    #[cfg(target_os = "linux")]
    pub ssh: Option<crate::sshd::SshFleet>,
}

/// Whether a `runs list` state names an open run (a ledger stage, possibly marked
/// ` (shadow)`), rather than a closed run's outcome.
pub fn is_open_state(state: &str) -> bool {
    [
        "created",
        "escalated",
        "continued",
        "awaiting-approval",
        "approved",
        "executing",
    ]
    .contains(&state.trim_end_matches(" (shadow)"))
}

/// Whether a `runs list` state names a run still at work: open, and not waiting for a person
/// (an escalation to continue, a plan to approve, a token to present).
pub fn is_working_state(state: &str) -> bool {
    ["created", "continued", "executing"].contains(&state.trim_end_matches(" (shadow)"))
}

/// The real sshd targets a lab starts: the `pwsh` and `sshd` programs and `(name, role, class)`.
#[derive(Debug)]
pub struct SshHosts<'a> {
    pub pwsh: PathBuf,
    pub sshd: PathBuf,
    pub names: &'a [(&'a str, &'a str, &'a str)],
}

/// Every operator identity a lab issues a client certificate for.
pub const OPERATORS: [&str; 5] = ["alice", "bob", "carol", "dave", "erin"];

/// `(name, role, safety_class)` of the default lab: two web hosts and a protected db host.
pub const DEFAULT_HOSTS: &[(&str, &str, &str)] = &[
    ("web1", "web", "standard"),
    ("web2", "web", "standard"),
    ("db1", "db", "protected"),
];

impl Lab {
    pub async fn start(hosts: &[(&str, &str, &str)]) -> anyhow::Result<Lab> {
        Self::start_with(hosts, &crate::operations::story(), "", Vec::new()).await
    }

    pub async fn start_with(
        hosts: &[(&str, &str, &str)],
        operations: &str,
        coordinator_extra: &str,
        serve_env: Vec<(&'static str, String)>,
    ) -> anyhow::Result<Lab> {
        Self::start_mixed(hosts, &[], operations, coordinator_extra, serve_env).await
    }

    /// Agent hosts plus PowerShell Remoting hosts (`ps_hosts`, WinRM mode) served by the pwsh
    /// stand-in, which the coordinator runs in place of `pwsh`. A ps host's home is
    /// `<root>/ps-NAME`, its markers under `home/markers`, its session state under `home/state`.
    pub async fn start_mixed(
        hosts: &[(&str, &str, &str)],
        ps_hosts: &[(&str, &str, &str)],
        operations: &str,
        coordinator_extra: &str,
        serve_env: Vec<(&'static str, String)>,
    ) -> anyhow::Result<Lab> {
        Self::start_inner(
            hosts,
            ps_hosts,
            None,
            operations,
            coordinator_extra,
            serve_env,
        )
        .await
    }

    async fn start_inner(
        hosts: &[(&str, &str, &str)],
        ps_hosts: &[(&str, &str, &str)],
        #[cfg_attr(not(target_os = "linux"), allow(unused_variables))] ssh: Option<SshHosts<'_>>,
        operations: &str,
        coordinator_extra: &str,
        serve_env: Vec<(&'static str, String)>,
    ) -> anyhow::Result<Lab> {
        let pki = TestPki::new()?;
        let mut agents = BTreeMap::new();
        let mut lab_hosts = Vec::new();
        for (i, (name, role, class)) in hosts.iter().enumerate() {
            let octet = u8::try_from(10 + i)?;
            let agent = AgentProcess::start(&pki, &AgentOptions::new(name, octet)).await?;
            let home = agent
                .state_dir
                .parent()
                .context("agent home")?
                .to_path_buf();
            std::fs::write(home.join("facts.json"), r#"{"app_version":"1.0"}"#)?;
            lab_hosts.push(LabHost {
                name: name.to_string(),
                role: role.to_string(),
                safety_class: class.to_string(),
                addr: agent.addr,
            });
            agents.insert(name.to_string(), agent);
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
        let mut inventory_text = lab::inventory_toml(FLEET, &lab_hosts);
        for (name, role, class) in ps_hosts {
            let home = root.join(format!("ps-{name}"));
            std::fs::create_dir_all(home.join("markers"))?;
            let _ = writeln!(
                inventory_text,
                "[[hosts]]\nname = \"{name}\"\nrole = \"{role}\"\nsafety_class = \"{class}\"\n[hosts.transport.psremoting]\ncomputer_name = \"{name}.corp.example\"\nstate_dir = {:?}\n",
                home.join("state")
            );
        }
        #[cfg(target_os = "linux")]
        let ssh = match ssh {
            Some(SshHosts { pwsh, sshd, names }) => {
                let just_names: Vec<&str> = names.iter().map(|(n, _, _)| *n).collect();
                let fleet = crate::sshd::SshFleet::start(&root, &just_names, 40, &pwsh, &sshd)?;
                for (name, role, class) in names {
                    inventory_text.push_str(&fleet.inventory_entry(name, role, class)?);
                }
                Some((fleet, pwsh))
            }
            None => None,
        };
        #[cfg(target_os = "linux")]
        let coordinator_extra = match &ssh {
            Some((_, pwsh)) => {
                // Named relative to coordinator.toml, which serve must resolve from its own
                // directory whatever its working directory.
                std::fs::create_dir_all(root.join("bin"))?;
                std::os::unix::fs::symlink(pwsh, root.join("bin/pwsh"))?;
                format!("pwsh = \"bin/pwsh\"\n{coordinator_extra}")
            }
            None => coordinator_extra.to_string(),
        };
        let coordinator_extra = if ps_hosts.is_empty() {
            coordinator_extra.to_string()
        } else {
            format!(
                "pwsh = {:?}\n{coordinator_extra}",
                crate::bins::path("tollgate-pwsh-standin")?
            )
        };
        let coordinator_extra = coordinator_extra.as_str();
        std::fs::write(&inventory, inventory_text)?;
        std::fs::write(&ops, operations)?;
        std::fs::write(
            &config,
            lab::coordinator_toml(
                &pki.pki,
                "127.0.0.1:0".parse()?,
                &root.join("state"),
                &inventory,
                &ops,
                // alice operates and approves, bob approves, carol only views, erin only
                // operates (she asks, others approve), dave has nothing.
                &[
                    ("alice", &["operator", "approver"]),
                    ("bob", &["approver"]),
                    ("carol", &["viewer"]),
                    ("erin", &["operator"]),
                ],
                coordinator_extra,
            )?,
        )?;
        let mut lab = Lab {
            pki,
            agents,
            serve: None,
            config,
            serve_env,
            #[cfg(target_os = "linux")]
            ssh: None,
        };
        #[cfg(target_os = "linux")]
        {
            lab.ssh = ssh.map(|(fleet, _)| fleet);
        }
        lab.start_serve().await?;
        Ok(lab)
    }

    /// PowerShell Remoting hosts over real SSH only: one real sshd per host on 127.0.0.40+,
    /// reached by the real `pwsh` (see [`crate::sshd::SshFleet`]). A host's home is
    /// `<root>/ssh-NAME`.
    #[cfg(target_os = "linux")]
    pub async fn start_ssh(
        pwsh: &Path,
        sshd: &Path,
        ssh_hosts: &[(&str, &str, &str)],
        operations: &str,
    ) -> anyhow::Result<Lab> {
        Self::start_inner(
            &[],
            &[],
            Some(SshHosts {
                pwsh: pwsh.to_path_buf(),
                sshd: sshd.to_path_buf(),
                names: ssh_hosts,
            }),
            operations,
            "",
            Vec::new(),
        )
        .await
    }

    /// Starts (or restarts) `tollgate serve` on the lab's config and rewrites the clients.
    pub async fn start_serve(&mut self) -> anyhow::Result<()> {
        let serve = ServeProcess::start(&self.config, &self.serve_env).await?;
        for op in crate::lab::OPERATORS {
            std::fs::write(
                self.client_file(op),
                lab::client_toml(&self.pki.pki, op, serve.addr)?,
            )?;
        }
        self.serve = Some(serve);
        Ok(())
    }

    pub fn client_file(&self, who: &str) -> PathBuf {
        self.pki.root().join(format!("client-{who}.toml"))
    }

    pub fn runs_dir(&self) -> PathBuf {
        self.pki.root().join("state").join("runs")
    }

    /// The home directory of a host (its facts, markers and slow switches).
    pub fn home(&self, host: &str) -> PathBuf {
        match self.agents.get(host) {
            Some(a) => a
                .state_dir
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default(),
            #[cfg(target_os = "linux")]
            None if self
                .ssh
                .as_ref()
                .is_some_and(|f| f.names().any(|n| n == host)) =>
            {
                self.pki.root().join(format!("ssh-{host}"))
            }
            None => self.pki.root().join(format!("ps-{host}")),
        }
    }

    /// How many times `step` ran on `host`.
    pub fn ran(&self, host: &str, step: &str) -> usize {
        crate::evidence::finished(&self.home(host), step)
    }

    /// The begun/completed markers of every agent host, to compare before and after an act.
    pub fn markers(&self) -> crate::evidence::Markers {
        crate::evidence::Markers::read(
            self.agents
                .keys()
                .map(|h| (h.clone(), self.home(h)))
                .collect::<BTreeMap<String, PathBuf>>(),
        )
    }

    /// Total runs of `step` across the agent hosts.
    pub fn ran_anywhere(&self, step: &str) -> usize {
        self.agents.keys().map(|h| self.ran(h, step)).sum()
    }

    pub fn set_fact(&self, host: &str, json: &str) -> anyhow::Result<()> {
        Ok(std::fs::write(self.home(host).join("facts.json"), json)?)
    }

    /// Runs `tollgate ARGS --json` as `who`.
    pub async fn cli(&self, who: &str, args: &[&str]) -> anyhow::Result<CliOut> {
        let bin = crate::bins::path("tollgate")?;
        let out = tokio::time::timeout(
            Duration::from_secs(120),
            Command::new(bin)
                .args(args)
                .arg("--json")
                .env("TOLLGATE_CLIENT", self.client_file(who))
                .output(),
        )
        .await
        .context("tollgate CLI did not finish in 120 s")??;
        Ok(CliOut::from(out))
    }

    /// Starts `tollgate ARGS --json` as `who` in the background (for acting while it runs).
    pub fn spawn_cli(
        &self,
        who: &str,
        args: &[&str],
    ) -> tokio::task::JoinHandle<anyhow::Result<CliOut>> {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let client = self.client_file(who);
        tokio::spawn(async move {
            let bin = crate::bins::path("tollgate")?;
            let out = Command::new(bin)
                .args(&args)
                .arg("--json")
                .env("TOLLGATE_CLIENT", client)
                .output()
                .await?;
            Ok(CliOut::from(out))
        })
    }

    /// Full teardown of `hosts` up to a token ([`crate::invariants::approved_teardown`]).
    pub async fn approved_teardown(&self, hosts: &str) -> anyhow::Result<(String, String, String)> {
        crate::invariants::approved_teardown(self, hosts).await
    }
}

impl Lab {
    /// Validates every `summary.json` under the runs directory against the published schema.
    /// Returns how many were checked.
    pub fn validate_summaries(&self) -> anyhow::Result<usize> {
        crate::evidence::validate_summaries_in(&self.runs_dir())
    }
}
