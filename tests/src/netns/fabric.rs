//! The fabric: namespaces, bridge, veths.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::process::Stdio;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::Context;

/// True when `TOLLGATE_SKIP_NETNS=1`: the namespace scenarios return early (and say so).
pub fn skip_requested() -> bool {
    std::env::var("TOLLGATE_SKIP_NETNS").is_ok_and(|v| v.trim() == "1")
}

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
pub(super) fn pids_in(ns: &str) -> Vec<i32> {
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
