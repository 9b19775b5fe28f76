//! A namespace fleet for fault injection: every agent in its own network namespace, the
//! coordinator (and the CLI) in another, all joined by veth pairs to a bridge that lives in a
//! namespace of its own. Addresses are `198.18.0.0/24`, inside the `198.18.0.0/15` range set aside
//! for benchmark and test networks (RFC 2544); each fabric has private namespaces, so fabrics
//! running side by side never see each other.
//!
//! ```text
//!   PREFIX-co (coordinator, CLI)        PREFIX-h0 (web1)   PREFIX-h1 (web2)   PREFIX-h2 (db1)
//!   eth0 198.18.0.1                     eth0 .10           eth0 .11           eth0 .12
//!        │                                   │                  │                  │
//!   ─────┴── vc ─────────── br0 (PREFIX-br) ─┴── v0 ────────────┴── v1 ────────────┴── v2
//! ```
//!
//! Faults, per link: **cut** puts the bridge-side veth down (the peer loses carrier: a clean
//! partition, nothing is delivered either way), **heal** brings it back. **Delay** adds
//! `tc netem delay` on the bridge-side veth (traffic towards the host); kernels built without
//! `sch_netem` (the CI VM's is one) get the same delay from a userspace UDP relay in the
//! coordinator's namespace that the inventory dials for that host ([`Relay`]). Every process can be
//! SIGKILLed and restarted; [`NetLab::crash_host`] kills everything in a host's namespace (the
//! agent and the scripts it runs), like a power cut.
//!
//! Making namespaces needs root (`CAP_SYS_ADMIN` and `CAP_NET_ADMIN`) and `ip` (iproute2). When
//! they cannot be made, [`Fabric::new`] fails with a message that says so: the suite fails loudly
//! rather than passing empty. `TOLLGATE_SKIP_NETNS=1` ([`skip_requested`]) is the one explicit way
//! to skip the namespace scenarios on a developer machine without root.
//!
//! Namespaces are named `tgf<pid>n<counter>-*`; [`Fabric`]'s `Drop` kills what runs inside them and
//! deletes them, and every new fabric first sweeps away those left by test processes that died.
#![cfg(target_os = "linux")]

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tollgate_certs::Role;
use tollgate_coordinator::lab::{self, LabHost};

use crate::fleet::{FLEET, START_LIMIT, TestPki};
use crate::lab::CliOut;

/// True when `TOLLGATE_SKIP_NETNS=1`: the namespace scenarios return early (and say so).
pub fn skip_requested() -> bool {
    std::env::var("TOLLGATE_SKIP_NETNS").is_ok_and(|v| v.trim() == "1")
}

// ---------------------------------------------------------------------------------------------
// Seeds and randomized timing
// ---------------------------------------------------------------------------------------------

/// SplitMix64: small, fast, and the same sequence for the same seed on every machine.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Uniform in `lo..=hi` milliseconds.
    pub fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi.saturating_sub(lo) + 1))
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        let i = usize::try_from(self.below(items.len() as u64)).unwrap_or(0);
        &items[i.min(items.len().saturating_sub(1))]
    }

    /// A seed for one repetition, derived so repetitions do not share a sequence.
    pub fn fork(&mut self) -> u64 {
        self.next_u64()
    }
}

/// The seed of a scenario: `TOLLGATE_FAULT_SEED` if set, else fresh. Printed either way, with the
/// command that replays it.
pub fn scenario_seed(scenario: &str) -> u64 {
    seed_for("--test faults_netns --test faults_abuse", scenario)
}

/// The seed of `scenario` in the test binaries `tests` (as cargo names them, e.g. `--test
/// ledger_seams`): `TOLLGATE_FAULT_SEED` if set, else fresh. Printed either way, with the
/// command that replays it.
pub fn seed_for(tests: &str, scenario: &str) -> u64 {
    let seed = std::env::var("TOLLGATE_FAULT_SEED")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or_else(|| {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            Rng::new(t ^ u64::from(std::process::id()).rotate_left(32)).next_u64()
        });
    eprintln!(
        "fault seed = {seed} (scenario {scenario}; replay with TOLLGATE_FAULT_SEED={seed} cargo test -p tollgate-tests {tests} {scenario})"
    );
    seed
}

// ---------------------------------------------------------------------------------------------
// The fabric: namespaces, bridge, veths
// ---------------------------------------------------------------------------------------------

static COUNTER: AtomicU32 = AtomicU32::new(0);
const NS_TAG: &str = "tgf";
/// The coordinator's address on every fabric.
pub const COORDINATOR_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const COORDINATOR_PORT: u16 = 7440;
pub const AGENT_PORT: u16 = 7443;

/// Runs `TOOL ARGS` (`ip` or `tc`; `args` split on whitespace: no names here contain any) and
/// fails with its stderr.
fn run_tool(tool: &str, args: &str) -> anyhow::Result<()> {
    let out = std::process::Command::new(tool)
        .args(args.split_whitespace())
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run `{tool}` (install iproute2)"))?;
    anyhow::ensure!(
        out.status.success(),
        "`{tool} {args}` failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

fn ip(args: &str) -> anyhow::Result<()> {
    run_tool("ip", args)
}

fn tc(args: &str) -> anyhow::Result<()> {
    run_tool("tc", args)
}

/// Pids of every process in namespace `ns`.
fn pids_in(ns: &str) -> Vec<i32> {
    std::process::Command::new("ip")
        .args(["netns", "pids", ns])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// SIGKILLs every process in `ns` (all of them started by this harness: agents, serve, scripts).
fn kill_all_in(ns: &str) {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    for pid in pids_in(ns) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

fn delete_ns(ns: &str) {
    kill_all_in(ns);
    let _ = ip(&format!("netns delete {ns}"));
}

/// Deletes fabrics left behind by test processes that are gone (SIGKILLed runs never drop).
fn sweep_stale() {
    let Ok(out) = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
    else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix(NS_TAG)
            .and_then(|r| r.split_once('n'))
            .and_then(|(p, _)| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !crate::proc::alive(pid) {
            delete_ns(name);
        }
    }
}

/// One member of the fabric: a namespace with `eth0`, joined to the bridge by `bridge_port`.
#[derive(Debug, Clone)]
pub struct Member {
    pub ns: String,
    pub ip: Ipv4Addr,
    /// The veth end on the bridge (in the bridge's namespace).
    pub bridge_port: String,
}

/// Namespaces, a bridge and one veth pair per member. Deleted (processes killed) on drop.
#[derive(Debug)]
pub struct Fabric {
    pub prefix: String,
    pub bridge_ns: String,
    pub coordinator: Member,
    /// Host name -> member.
    pub hosts: BTreeMap<String, Member>,
    netem: Mutex<Option<bool>>,
    created: Vec<String>,
}

impl Fabric {
    /// Creates the namespaces for a coordinator and `hosts` (at most 200). Fails loudly if the
    /// machine cannot make namespaces.
    pub fn new(hosts: &[&str]) -> anyhow::Result<Fabric> {
        anyhow::ensure!(hosts.len() <= 200, "at most 200 hosts per fabric");
        sweep_stale();
        let prefix = format!(
            "{NS_TAG}{}n{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let mut fabric = Fabric {
            bridge_ns: format!("{prefix}-br"),
            coordinator: Member {
                ns: format!("{prefix}-co"),
                ip: COORDINATOR_IP,
                bridge_port: "vc".into(),
            },
            hosts: BTreeMap::new(),
            prefix,
            netem: Mutex::new(None),
            created: Vec::new(),
        };
        let br = fabric.bridge_ns.clone();
        ip(&format!("netns add {br}")).map_err(|e| {
            anyhow::anyhow!(
                "cannot create a network namespace ({e}). The fault scenarios need root (CAP_SYS_ADMIN, CAP_NET_ADMIN) and iproute2; run them as root (CI does, see .ci/faults.sh), or set TOLLGATE_SKIP_NETNS=1 to skip them explicitly"
            )
        })?;
        fabric.created.push(br.clone());
        ip(&format!("-n {br} link add br0 type bridge"))?;
        ip(&format!("-n {br} link set br0 up"))?;
        let coordinator = fabric.coordinator.clone();
        fabric.join(&coordinator)?;
        for (i, h) in hosts.iter().enumerate() {
            let m = Member {
                ns: format!("{}-h{i}", fabric.prefix),
                ip: Ipv4Addr::new(198, 18, 0, u8::try_from(10 + i)?),
                bridge_port: format!("v{i}"),
            };
            fabric.join(&m)?;
            fabric.hosts.insert((*h).to_string(), m);
        }
        Ok(fabric)
    }

    fn join(&mut self, m: &Member) -> anyhow::Result<()> {
        let (ns, port, br) = (&m.ns, &m.bridge_port, &self.bridge_ns);
        ip(&format!("netns add {ns}"))?;
        self.created.push(ns.clone());
        ip(&format!(
            "-n {br} link add {port} type veth peer name eth0 netns {ns}"
        ))?;
        ip(&format!("-n {br} link set {port} master br0"))?;
        ip(&format!("-n {br} link set {port} up"))?;
        ip(&format!("-n {ns} link set lo up"))?;
        ip(&format!("-n {ns} addr add {}/24 dev eth0", m.ip))?;
        ip(&format!("-n {ns} link set eth0 up"))?;
        Ok(())
    }

    /// The member for a host name, or `"coordinator"`.
    pub fn member(&self, who: &str) -> anyhow::Result<&Member> {
        if who == "coordinator" {
            return Ok(&self.coordinator);
        }
        self.hosts
            .get(who)
            .with_context(|| format!("no host {who} in the fabric"))
    }

    /// Cuts `who`'s link (a host name or `"coordinator"`): nothing crosses it either way.
    pub fn cut(&self, who: &str) -> anyhow::Result<()> {
        let port = &self.member(who)?.bridge_port;
        ip(&format!("-n {} link set {port} down", self.bridge_ns))
    }

    /// Restores `who`'s link.
    pub fn heal(&self, who: &str) -> anyhow::Result<()> {
        let port = &self.member(who)?.bridge_port;
        ip(&format!("-n {} link set {port} up", self.bridge_ns))
    }

    /// Whether this kernel has `sch_netem` (probed once).
    pub fn netem_available(&self) -> bool {
        let mut known = self.netem.lock().unwrap_or_else(|e| e.into_inner());
        *known.get_or_insert_with(|| {
            let (br, port) = (&self.bridge_ns, &self.coordinator.bridge_port);
            let ok = tc(&format!(
                "-n {br} qdisc add dev {port} root netem delay 1ms"
            ))
            .is_ok();
            if ok {
                let _ = tc(&format!("-n {br} qdisc del dev {port} root"));
            }
            ok
        })
    }

    /// `tc netem delay` on the bridge side of `who`'s link (traffic towards it).
    pub fn netem_delay(&self, who: &str, delay: Duration) -> anyhow::Result<()> {
        let port = &self.member(who)?.bridge_port;
        tc(&format!(
            "-n {} qdisc replace dev {port} root netem delay {}ms limit 100000",
            self.bridge_ns,
            delay.as_millis()
        ))
    }

    /// Removes a netem qdisc from `who`'s link (no error if there is none).
    pub fn netem_clear(&self, who: &str) -> anyhow::Result<()> {
        let port = &self.member(who)?.bridge_port;
        let _ = tc(&format!("-n {} qdisc del dev {port} root", self.bridge_ns));
        Ok(())
    }

    /// SIGKILLs every process in `who`'s namespace.
    pub fn kill_everything_in(&self, who: &str) -> anyhow::Result<()> {
        kill_all_in(&self.member(who)?.ns);
        Ok(())
    }
}

impl Drop for Fabric {
    fn drop(&mut self) {
        for ns in self.created.iter().rev() {
            delete_ns(ns);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A userspace delay relay (for kernels without sch_netem)
// ---------------------------------------------------------------------------------------------

/// What a [`Relay`] does with the packets it carries towards the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayMode {
    Pass,
    /// Every datagram towards the host is held this long (order kept).
    Delay(Duration),
}

/// A UDP relay between the coordinator and one agent, bound in the coordinator's namespace:
/// the inventory dials `listen`, the relay forwards to `target` and back. Only the direction
/// towards the agent is delayed, as `tc netem` on the bridge port would.
#[derive(Debug)]
pub struct Relay {
    pub listen: SocketAddr,
    pub target: SocketAddr,
    mode: Arc<Mutex<RelayMode>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Binds a UDP socket inside a namespace. The library cannot enter namespaces itself (that needs
/// `setns`, which its `nix` build leaves out), so the test provides this.
pub type UdpBinder = fn(ns: &str, addr: SocketAddr) -> std::io::Result<std::net::UdpSocket>;

impl Relay {
    /// Starts relaying between `down` (the address the coordinator dials) and `up` (a socket
    /// that reaches `target`). Must be called inside a tokio runtime.
    pub fn start(
        down: std::net::UdpSocket,
        up: std::net::UdpSocket,
        target: SocketAddr,
    ) -> anyhow::Result<Relay> {
        down.set_nonblocking(true)?;
        up.set_nonblocking(true)?;
        let listen = down.local_addr()?;
        let down = Arc::new(tokio::net::UdpSocket::from_std(down)?);
        let up = Arc::new(tokio::net::UdpSocket::from_std(up)?);
        let mode = Arc::new(Mutex::new(RelayMode::Pass));
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));
        let (tx, mut rx) =
            tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
        let towards_host = {
            let (down, mode, client) = (down.clone(), mode.clone(), client.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                while let Ok((n, from)) = down.recv_from(&mut buf).await {
                    *client.lock().unwrap_or_else(|e| e.into_inner()) = Some(from);
                    let hold = match *mode.lock().unwrap_or_else(|e| e.into_inner()) {
                        RelayMode::Pass => Duration::ZERO,
                        RelayMode::Delay(d) => d,
                    };
                    if tx
                        .send((tokio::time::Instant::now() + hold, buf[..n].to_vec()))
                        .is_err()
                    {
                        break;
                    }
                }
            })
        };
        let sender = {
            let up = up.clone();
            tokio::spawn(async move {
                while let Some((at, bytes)) = rx.recv().await {
                    tokio::time::sleep_until(at).await;
                    let _ = up.send_to(&bytes, target).await;
                }
            })
        };
        let back = {
            let (down, up, client) = (down.clone(), up.clone(), client.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                while let Ok((n, from)) = up.recv_from(&mut buf).await {
                    if from != target {
                        continue;
                    }
                    let to = *client.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(to) = to {
                        let _ = down.send_to(&buf[..n], to).await;
                    }
                }
            })
        };
        Ok(Relay {
            listen,
            target,
            mode,
            tasks: vec![towards_host, sender, back],
        })
    }

    pub fn set(&self, mode: RelayMode) {
        *self.mode.lock().unwrap_or_else(|e| e.into_inner()) = mode;
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Processes inside namespaces
// ---------------------------------------------------------------------------------------------

/// Spawns `ip netns exec NS BIN ARGS` (ip execs the binary: the child's pid is the program's),
/// and waits for the stdout line starting with `ready`; returns the rest of that line.
async fn spawn_in(
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
    child: Option<Child>,
}

impl NetAgent {
    async fn start(pki: &TestPki, name: &str, member: &Member) -> anyhow::Result<NetAgent> {
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
    child: Child,
}

impl NetServe {
    /// SIGKILL: no chance to clean up.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The lab on the fabric
// ---------------------------------------------------------------------------------------------

/// The fault lab's operations. Like [`crate::lab::operations`], each step appends to
/// `markers/STEP` when it finishes, and also to `markers/STEP.begun` when it starts, so an
/// execution that was cut short still counts. A file `gate-STEP` in the host's home holds the step
/// after it began (it writes `started-STEP` and waits, at most 80 s, until the gate is removed),
/// so a test can inject a fault at a known point. `gate-probe` does the same for the probe (the
/// barrier re-probe, when armed after approval).
pub fn operations() -> String {
    let h = r#"H=\"$TOLLGATE_AGENT_STATE/..\"; mkdir -p \"$H/markers\""#;
    let gate = |name: &str| {
        format!(
            r#"if [ -f \"$H/gate-{name}\" ]; then echo started > \"$H/started-{name}\"; i=0; while [ -f \"$H/gate-{name}\" ] && [ $i -lt 1600 ]; do sleep 0.05; i=$((i+1)); done; fi"#
        )
    };
    let step = |id: &str, destructive: bool| {
        format!(
            r#"[[{action}.phases]]
name = "{id}"
[[{action}.phases.steps]]
id = "{id}"
roles = ["web", "db"]
shell = "sh"
run = "{h}; echo x >> \"$H/markers/{id}.begun\"; {gate}; echo x >> \"$H/markers/{id}\""
destructive = {destructive}
timeout = "90s"
"#,
            action = if matches!(id, "prepare" | "install") {
                "deploy"
            } else {
                "teardown"
            },
            gate = gate(id),
        )
    };
    let probe = format!(
        r#"shell = "sh"
run = "H=\"$TOLLGATE_AGENT_STATE/..\"; {gate}; cat \"$H/facts.json\"""#,
        gate = gate("probe")
    );
    format!(
        "{}\n{}\n{}\n{}\n[probes.web]\n{probe}\n\n[probes.db]\n{probe}\n",
        step("prepare", false),
        step("install", false),
        step("drain", false),
        step("remove", true),
    )
}

/// The steps of [`operations`], in order.
pub const STEPS: &[&str] = &["prepare", "install", "drain", "remove"];
/// The destructive step.
pub const DESTRUCTIVE: &str = "remove";

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
        std::fs::write(&ops, operations())?;
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
        count_lines(&self.home(host).join("markers").join(step))
    }

    /// Executions of `step` on `host` that began (`markers/STEP.begun`).
    pub fn begun(&self, host: &str, step: &str) -> usize {
        count_lines(
            &self
                .home(host)
                .join("markers")
                .join(format!("{step}.begun")),
        )
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
        Ok(CliOut {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
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
            Ok(CliOut {
                code: out.status.code().unwrap_or(-1),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            })
        }))
    }

    /// Full teardown of `hosts` up to a token: erin asks, alice approves (and bob when two are
    /// needed); the requester never approves her own run.
    /// Returns (run id, token, operation hash).
    pub async fn approved_teardown(&self, hosts: &str) -> anyhow::Result<(String, String, String)> {
        let run = uuid::Uuid::new_v4().to_string();
        let out = self
            .cli(
                "erin",
                &[
                    "teardown", "--mode", "full", "--hosts", hosts, "--run", &run,
                ],
            )
            .await?;
        anyhow::ensure!(
            out.outcome() == "ConfirmationRequired",
            "expected ConfirmationRequired: {out:?}"
        );
        let hash = out.json()["outcome"]["ConfirmationRequired"]["operation_hash"]
            .as_str()
            .context("operation hash")?
            .to_string();
        for who in ["alice", "bob"] {
            let a = self
                .cli(who, &["approve", &run, "--operation-hash", &hash])
                .await?;
            if let Some(t) = a.json()["token"].as_str() {
                return Ok((run, t.to_string(), hash));
            }
            anyhow::ensure!(
                a.code == 12,
                "approval by {who} neither issued nor recorded: {a:?}"
            );
        }
        anyhow::bail!("no token issued for {run}")
    }

    /// Validates every `summary.json` against the published schema; returns how many.
    pub fn validate_summaries(&self) -> anyhow::Result<usize> {
        validate_summaries_in(&self.runs_dir())
    }
}

fn count_lines(p: &Path) -> usize {
    std::fs::read_to_string(p)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

/// Validates every `summary.json` under `runs_dir`; returns how many were checked.
pub fn validate_summaries_in(runs_dir: &Path) -> anyhow::Result<usize> {
    let validator = crate::lab::summary_schema()?;
    let mut n = 0;
    for entry in std::fs::read_dir(runs_dir)? {
        let path = entry?.path().join("summary.json");
        if !path.exists() {
            continue;
        }
        let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
        let errors: Vec<String> = validator
            .iter_errors(&doc)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        anyhow::ensure!(
            errors.is_empty(),
            "{} does not match the schema: {}",
            path.display(),
            errors.join("; ")
        );
        n += 1;
    }
    Ok(n)
}

// ---------------------------------------------------------------------------------------------
// Evidence: markers on the hosts, journals on the coordinator
// ---------------------------------------------------------------------------------------------

/// Marker counts of every host, `(host, step) -> (began, finished)`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Markers(pub BTreeMap<(String, String), (usize, usize)>);

impl Markers {
    /// Reads the markers of hosts whose homes are given.
    pub fn read(homes: BTreeMap<String, PathBuf>) -> Markers {
        let mut m = BTreeMap::new();
        for (host, home) in homes {
            for step in STEPS {
                let dir = home.join("markers");
                let began = count_lines(&dir.join(format!("{step}.begun")));
                let done = count_lines(&dir.join(step));
                m.insert((host.clone(), step.to_string()), (began, done));
            }
        }
        Markers(m)
    }

    /// Executions that began since `before`, per (host, step).
    pub fn began_since(&self, before: &Markers) -> BTreeMap<(String, String), usize> {
        self.0
            .iter()
            .map(|(k, (b, _))| {
                let was = before.0.get(k).map(|(b, _)| *b).unwrap_or(0);
                (k.clone(), b.saturating_sub(was))
            })
            .collect()
    }
}

/// What a run's journal says was dispatched, and on what grounds.
#[derive(Debug, Clone, Default)]
pub struct JournalFacts {
    /// `step_dispatched` events per (host, step).
    pub dispatched: BTreeMap<(String, String), usize>,
    /// Destructive dispatches that lacked, earlier in the same journal, an allowed token and an
    /// allowing barrier after a fresh probe report of that host. Must stay empty.
    pub unjustified: Vec<String>,
    pub events: usize,
}

/// Reads `runs_dir/RUN/timeline.jsonl` and checks the grounds of every destructive dispatch:
/// a `token_judged` allow, then (after the last `barrier_started`) a successful barrier
/// `probe_reported` for that host, then a `barrier_evaluated` allow whose inputs show that host's
/// fresh fingerprint equal to the planned one, all before the dispatch.
pub fn journal_facts(runs_dir: &Path, run: &str) -> anyhow::Result<JournalFacts> {
    let text = std::fs::read_to_string(runs_dir.join(run).join("timeline.jsonl"))
        .with_context(|| format!("timeline of {run}"))?;
    let mut facts = JournalFacts::default();
    let mut token_ok = false;
    let mut in_barrier = false;
    let mut reprobed: Vec<String> = Vec::new();
    let mut matched: Vec<String> = Vec::new();
    let mut barrier_ok = false;
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("timeline of {run}: not JSON: {line}"))?;
        facts.events += 1;
        let kind = v["kind"].as_str().unwrap_or_default();
        let host = v["host"].as_str().unwrap_or_default().to_string();
        let decision = v["decision"].as_str().unwrap_or_default();
        match kind {
            "token_judged" => token_ok = decision == "allow",
            "barrier_started" => {
                in_barrier = true;
                barrier_ok = false;
                reprobed.clear();
                matched.clear();
            }
            "probe_reported"
                if in_barrier
                    && v["inputs"]["purpose"] == "barrier"
                    && v["inputs"]["fingerprint"].is_string() =>
            {
                reprobed.push(host);
            }
            "barrier_evaluated" => {
                in_barrier = false;
                barrier_ok = decision == "allow";
                if let Some(inputs) = v["inputs"].as_object() {
                    for (k, seen) in inputs {
                        let (Some(h), Some(seen)) = (k.strip_prefix("host."), seen.as_str()) else {
                            continue;
                        };
                        let field = |name: &str| {
                            seen.split_whitespace()
                                .find_map(|w| w.strip_prefix(name))
                                .map(str::to_string)
                        };
                        if let (Some(fresh), Some(planned)) =
                            (field("fingerprint="), field("planned="))
                            && !fresh.is_empty()
                            && fresh == planned
                        {
                            matched.push(h.to_string());
                        }
                    }
                }
            }
            "step_dispatched" => {
                let step = v["step"].as_str().unwrap_or_default().to_string();
                *facts
                    .dispatched
                    .entry((host.clone(), step.clone()))
                    .or_default() += 1;
                let grounded =
                    token_ok && barrier_ok && reprobed.contains(&host) && matched.contains(&host);
                if step == DESTRUCTIVE && !grounded {
                    facts.unjustified.push(format!(
                        "{run}: {step} dispatched on {host} (token allowed: {token_ok}, barrier allowed: {barrier_ok}, re-probed: {}, fingerprint matched: {})",
                        reprobed.contains(&host),
                        matched.contains(&host)
                    ));
                }
            }
            _ => {}
        }
    }
    Ok(facts)
}

// ---------------------------------------------------------------------------------------------
// Results, for the table in tests/README.md
// ---------------------------------------------------------------------------------------------

/// One row of the scenario table. Written to `$TOLLGATE_FAULT_REPORT_DIR/NAME.row` when that is
/// set (`tests/scenarios.sh` sets it and splices the rows into `tests/README.md`).
#[derive(Debug, Clone)]
pub struct Row {
    pub scenario: String,
    pub repetitions: usize,
    pub faults: String,
    pub result: String,
    pub seed: u64,
}

impl Row {
    pub fn write(&self) -> anyhow::Result<()> {
        let Some(dir) = std::env::var_os("TOLLGATE_FAULT_REPORT_DIR") else {
            return Ok(());
        };
        let dir = PathBuf::from(dir);
        std::fs::create_dir_all(&dir)?;
        let cell = |s: &str| s.replace('|', "\\|").replace('\n', " ");
        std::fs::write(
            dir.join(format!("{}.row", self.scenario)),
            format!(
                "| `{}` | {} | {} | {} | {} |\n",
                self.scenario,
                self.repetitions,
                cell(&self.faults),
                cell(&self.result),
                self.seed
            ),
        )?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Invariants, checked the same way on the namespace fleet and on the loopback lab
// ---------------------------------------------------------------------------------------------

/// What the invariant checks need from a fleet.
pub trait Fleet {
    /// `tollgate ARGS --json` as `who`.
    fn run_cli(
        &self,
        who: &str,
        args: &[&str],
    ) -> impl std::future::Future<Output = anyhow::Result<CliOut>> + Send;
    fn runs_directory(&self) -> PathBuf;
    /// Host name -> home (markers, gates, facts).
    fn homes(&self) -> BTreeMap<String, PathBuf>;
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
            Ok(CliOut {
                code: out.status.code().unwrap_or(-1),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            })
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

impl Fleet for crate::lab::Lab {
    fn run_cli(
        &self,
        who: &str,
        args: &[&str],
    ) -> impl std::future::Future<Output = anyhow::Result<CliOut>> + Send {
        self.cli(who, args)
    }

    fn runs_directory(&self) -> PathBuf {
        self.runs_dir()
    }

    fn homes(&self) -> BTreeMap<String, PathBuf> {
        self.agents
            .keys()
            .map(|n| (n.clone(), self.home(n)))
            .collect()
    }
}

/// Outcomes a run may end in (SPEC §3, "Typed outcomes").
pub const TYPED_OUTCOMES: &[&str] = &[
    "PolicyBlocked",
    "EscalationRequired",
    "PreflightFailed",
    "TransportUnreachable",
    "CapabilityMismatch",
    "ExecutionFailed",
    "PartialSuccess",
    "Completed",
];

/// True if a CLI answer about a run carries a typed outcome with its documented exit code.
pub fn is_typed(out: &CliOut) -> bool {
    let code_of = |o: &str| match o {
        "Completed" => 0,
        "EscalationRequired" => 10,
        "PolicyBlocked" => 20,
        "PreflightFailed" => 21,
        "TransportUnreachable" => 22,
        "CapabilityMismatch" => 23,
        "ExecutionFailed" => 24,
        "PartialSuccess" => 25,
        _ => -1,
    };
    let o = out.outcome();
    TYPED_OUTCOMES.contains(&o.as_str()) && code_of(&o) == out.code
}

/// Per-scenario evidence, summed over repetitions; the table row is made from it.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    pub repetitions: usize,
    /// Runs whose execution was judged (typed outcome, or closed typed after a crash).
    pub runs: usize,
    pub typed: usize,
    /// Destructive steps that began on a host whose fresh re-probe failed or whose token was not
    /// valid, or without their grounds in the journal. Must be 0.
    pub destructive_violations: Vec<String>,
    /// (run, host, step) executions that began more than once. Must be 0.
    pub twice: Vec<String>,
    pub verified_ok: usize,
    pub verified: usize,
    pub tampered: usize,
    pub tampered_detected: usize,
    /// Free-form notes (outcome mix, mechanism used).
    pub notes: BTreeMap<String, usize>,
    pub problems: Vec<String>,
}

impl Tally {
    pub fn note(&mut self, what: impl Into<String>) {
        *self.notes.entry(what.into()).or_default() += 1;
    }

    pub fn merge(&mut self, other: Tally) {
        self.repetitions += other.repetitions;
        self.runs += other.runs;
        self.typed += other.typed;
        self.destructive_violations
            .extend(other.destructive_violations);
        self.twice.extend(other.twice);
        self.verified_ok += other.verified_ok;
        self.verified += other.verified;
        self.tampered += other.tampered;
        self.tampered_detected += other.tampered_detected;
        for (k, v) in other.notes {
            *self.notes.entry(k).or_default() += v;
        }
        self.problems.extend(other.problems);
    }

    pub fn passed(&self) -> bool {
        self.destructive_violations.is_empty()
            && self.twice.is_empty()
            && self.problems.is_empty()
            && self.typed == self.runs
            && self.verified_ok == self.verified
            && self.tampered_detected == self.tampered
    }

    /// The "result" cell of the table.
    pub fn summary(&self) -> String {
        let runs = if self.runs > 0 {
            format!("{}/{} runs typed; ", self.typed, self.runs)
        } else {
            String::new()
        };
        let mut s = format!(
            "{}: {runs}destructive without fresh re-probe or valid token: {}; step twice: {}; `runs verify` ok on {}/{} untampered",
            if self.passed() { "pass" } else { "FAIL" },
            self.destructive_violations.len(),
            self.twice.len(),
            self.verified_ok,
            self.verified,
        );
        if self.tampered > 0 {
            s.push_str(&format!(
                ", fails on {}/{} tampered",
                self.tampered_detected, self.tampered
            ));
        }
        if !self.notes.is_empty() {
            let notes: Vec<String> = self
                .notes
                .iter()
                .map(|(k, v)| format!("{k} ×{v}"))
                .collect();
            s.push_str(&format!(" ({})", notes.join(", ")));
        }
        if let Some(p) = self.problems.first() {
            s.push_str(&format!("; first problem: {p}"));
        }
        s
    }

    /// Writes the table row, then fails (with everything that went wrong) unless it passed.
    pub fn finish(self, scenario: &str, faults: &str, seed: u64) -> anyhow::Result<()> {
        Row {
            scenario: scenario.to_string(),
            repetitions: self.repetitions,
            faults: faults.to_string(),
            result: self.summary(),
            seed,
        }
        .write()?;
        eprintln!("{scenario}: {}", self.summary());
        anyhow::ensure!(
            self.passed(),
            "{scenario} (seed {seed}) failed: {}\nviolations: {:?}\ntwice: {:?}\nproblems: {:?}",
            self.summary(),
            self.destructive_violations,
            self.twice,
            self.problems
        );
        Ok(())
    }
}

/// Checks one run after it settled. `began` is what began on each (host, step) during it (marker
/// deltas); `refused` lists hosts on which nothing destructive may have begun (fresh re-probe
/// failed, token invalid, ...). Every check that fails is added to `tally`.
pub fn check_run(
    tally: &mut Tally,
    runs_dir: &Path,
    run: &str,
    began: &BTreeMap<(String, String), usize>,
    refused: &[String],
) {
    for ((host, step), n) in began {
        if *n > 1 {
            tally
                .twice
                .push(format!("{run}: {step} began {n} times on {host}"));
        }
        if step == DESTRUCTIVE && *n > 0 && refused.contains(host) {
            tally.destructive_violations.push(format!(
                "{run}: {step} began on {host}, whose re-probe failed or token was invalid"
            ));
        }
    }
    match journal_facts(runs_dir, run) {
        Err(e) => tally.problems.push(format!("{run}: {e:#}")),
        Ok(facts) => {
            tally.destructive_violations.extend(facts.unjustified);
            // An execution that began without the journal having dispatched it first.
            for ((host, step), n) in began {
                let d = facts
                    .dispatched
                    .get(&(host.clone(), step.clone()))
                    .copied()
                    .unwrap_or(0);
                if *n > d {
                    tally.problems.push(format!(
                        "{run}: {step} began {n} times on {host} but the journal dispatched it {d} times"
                    ));
                }
            }
        }
    }
}

/// After a scenario settled: no run is still `running`, `runs verify` passes on every run, every
/// summary matches the schema. Adds to `tally`; returns the runs listed.
pub async fn check_settled<F: Fleet>(
    fleet: &F,
    tally: &mut Tally,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let list = fleet.run_cli("carol", &["runs", "list"]).await?;
    let runs = list
        .json()
        .as_array()
        .cloned()
        .with_context(|| format!("runs list did not answer a list: {list:?}"))?;
    for r in &runs {
        let id = r["run_id"].as_str().unwrap_or_default();
        if crate::lab::is_working_state(r["state"].as_str().unwrap_or_default()) {
            tally.problems.push(format!(
                "run {id} is still at work ({}) after the scenario settled",
                r["state"]
            ));
        }
        let v = fleet.run_cli("carol", &["runs", "verify", id]).await?;
        tally.verified += 1;
        if v.code == 0 && v.json()["ok"] == true {
            tally.verified_ok += 1;
        } else {
            tally
                .problems
                .push(format!("untampered run {id} does not verify: {v:?}"));
        }
    }
    if let Err(e) = validate_summaries_in(&fleet.runs_directory()) {
        tally.problems.push(format!("{e:#}"));
    }
    Ok(runs)
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn line(kind: &str, host: &str, step: &str, decision: &str, inputs: &str) -> String {
        format!(
            r#"{{"kind":"{kind}","host":{},"step":{},"decision":{},"inputs":{{{inputs}}}}}"#,
            if host.is_empty() {
                "null".into()
            } else {
                format!("\"{host}\"")
            },
            if step.is_empty() {
                "null".into()
            } else {
                format!("\"{step}\"")
            },
            if decision.is_empty() {
                "null".into()
            } else {
                format!("\"{decision}\"")
            },
        )
    }

    fn facts(lines: &[String]) -> JournalFacts {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("r")).unwrap();
        std::fs::write(dir.path().join("r/timeline.jsonl"), lines.join("\n")).unwrap();
        journal_facts(dir.path(), "r").unwrap()
    }

    fn grounded(probe: bool, seen: &str, token: &str, barrier: &str) -> Vec<String> {
        let mut v = vec![
            line("token_judged", "", "", token, ""),
            line("barrier_started", "", "", "", ""),
        ];
        if probe {
            v.push(line(
                "probe_reported",
                "web1",
                "",
                "",
                r#""purpose":"barrier","fingerprint":"aa""#,
            ));
        }
        v.push(line(
            "barrier_evaluated",
            "",
            "",
            barrier,
            &format!(r#""host.web1":"fingerprint={seen} planned=aa probed_at_ms=1""#),
        ));
        v.push(line("step_dispatched", "web1", "remove", "allow", ""));
        v
    }

    #[test]
    fn a_destructive_dispatch_needs_token_reprobe_match_and_barrier() {
        assert!(
            facts(&grounded(true, "aa", "allow", "allow"))
                .unjustified
                .is_empty()
        );
        for bad in [
            grounded(false, "aa", "allow", "allow"),
            grounded(true, "bb", "allow", "allow"),
            grounded(true, "aa", "block", "allow"),
            grounded(true, "aa", "allow", "block"),
        ] {
            assert_eq!(facts(&bad).unjustified.len(), 1, "{bad:?}");
        }
        let f = facts(&grounded(true, "aa", "allow", "allow"));
        assert_eq!(f.dispatched[&("web1".into(), "remove".into())], 1);
    }

    #[test]
    fn a_step_begun_twice_or_undispatched_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("r")).unwrap();
        std::fs::write(
            dir.path().join("r/timeline.jsonl"),
            grounded(true, "aa", "allow", "allow").join("\n"),
        )
        .unwrap();
        let mut t = Tally::default();
        let began = BTreeMap::from([
            (("web1".to_string(), "remove".to_string()), 2),
            (("web2".to_string(), "drain".to_string()), 1),
        ]);
        check_run(&mut t, dir.path(), "r", &began, &["web1".to_string()]);
        assert_eq!(t.twice.len(), 1, "{t:?}");
        assert_eq!(t.destructive_violations.len(), 1, "{t:?}");
        assert_eq!(
            t.problems.len(),
            2,
            "began more often than dispatched: {t:?}"
        );
        assert!(!t.passed());
    }

    #[test]
    fn rng_replays_from_its_seed() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        let xs: Vec<u64> = (0..5).map(|_| a.below(1000)).collect();
        let ys: Vec<u64> = (0..5).map(|_| b.below(1000)).collect();
        assert_eq!(xs, ys);
        assert!(Rng::new(1).millis(10, 20) >= Duration::from_millis(10));
    }
}
