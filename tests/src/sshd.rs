//! Real `sshd` targets for PowerShell Remoting over SSH: one `sshd` per target on its own
//! 127.0.0.x address, with its own host key, an `authorized_keys` file, and the `powershell`
//! subsystem running the real `pwsh -sshs`. Keys come from the real `ssh-keygen`; the test
//! seeds its own `known_hosts`. Linux only (`/proc` is how a test finds what to kill).

use std::io::{BufRead as _, BufReader};
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context as _, bail};

/// How long sshd may take to say it listens.
const START_LIMIT: Duration = Duration::from_secs(30);

/// The `sshd` binary, if this machine has one.
pub fn sshd_program() -> Option<PathBuf> {
    ["/usr/sbin/sshd", "/usr/local/sbin/sshd", "/sbin/sshd"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// A key pair made by `ssh-keygen` (ed25519, no passphrase).
#[derive(Debug, Clone)]
pub struct KeyPair {
    /// The private key file (mode 0600).
    pub private: PathBuf,
    /// The public key line (`ssh-ed25519 AAAA... comment`).
    pub public: String,
}

impl KeyPair {
    /// Makes a new key pair at `path` (and `path.pub`).
    pub fn generate(path: &Path) -> anyhow::Result<KeyPair> {
        let status = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "tollgate-test", "-f"])
            .arg(path)
            .stdin(Stdio::null())
            .status()
            .context("running ssh-keygen")?;
        if !status.success() {
            bail!("ssh-keygen -f {} failed: {status}", path.display());
        }
        let public = std::fs::read_to_string(path.with_extension("pub"))
            .context("reading the public key")?
            .trim()
            .to_owned();
        Ok(KeyPair {
            private: path.to_path_buf(),
            public,
        })
    }

    /// `type base64`, without the comment: what a known_hosts entry carries.
    pub fn key_only(&self) -> String {
        self.public
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// What an sshd target is started with.
#[derive(Debug, Clone)]
pub struct SshdSpec {
    /// The address it listens on (127.0.0.x).
    pub addr: Ipv4Addr,
    /// The public key lines it accepts.
    pub authorized: Vec<String>,
    /// The `pwsh` its `powershell` subsystem runs.
    pub pwsh: PathBuf,
    /// The subsystem's name (`powershell` unless a test needs another).
    pub subsystem: String,
    /// More `sshd_config` lines (e.g. `SetEnv NAME=value`).
    pub extra: Vec<String>,
}

/// One running `sshd` target. Dropped: its whole process group is killed.
#[derive(Debug)]
pub struct Sshd {
    pub addr: Ipv4Addr,
    pub port: u16,
    /// Its host key.
    pub host_key: KeyPair,
    dir: PathBuf,
    program: PathBuf,
    child: Option<Child>,
}

impl Sshd {
    /// Writes a config under `dir` (host key, authorized_keys, subsystem) and starts sshd
    /// in the foreground, returning once it says it listens.
    pub fn start(program: &Path, dir: &Path, spec: &SshdSpec) -> anyhow::Result<Sshd> {
        std::fs::create_dir_all(dir)?;
        // Privilege separation wants this directory when sshd runs as root.
        let _ = std::fs::create_dir_all("/run/sshd");
        let host_key = KeyPair::generate(&dir.join("ssh_host_ed25519_key"))?;
        let authorized = dir.join("authorized_keys");
        std::fs::write(&authorized, spec.authorized.join("\n") + "\n")?;
        set_mode(&authorized, 0o600)?;
        let port = free_port(spec.addr)?;
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "ListenAddress {addr}:{port}\n\
                 HostKey {host_key}\n\
                 AuthorizedKeysFile {authorized}\n\
                 PidFile {dir}/sshd.pid\n\
                 StrictModes no\n\
                 UsePAM no\n\
                 PasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\n\
                 PermitRootLogin prohibit-password\n\
                 LogLevel VERBOSE\n\
                 Subsystem {subsystem} {pwsh} -sshs -NoLogo\n\
                 {extra}\n",
                extra = spec.extra.join("\n"),
                addr = spec.addr,
                host_key = host_key.private.display(),
                authorized = authorized.display(),
                dir = dir.display(),
                subsystem = spec.subsystem,
                pwsh = spec.pwsh.display(),
            ),
        )?;
        let mut sshd = Sshd {
            addr: spec.addr,
            port,
            host_key,
            dir: dir.to_path_buf(),
            program: program.to_path_buf(),
            child: None,
        };
        sshd.run()?;
        Ok(sshd)
    }

    /// Starts (again) the sshd process on the written config.
    pub fn run(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("sshd on {}:{} is already running", self.addr, self.port);
        }
        let mut cmd = Command::new(&self.program);
        cmd.arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(self.dir.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        #[cfg(unix)]
        {
            use std::os::unix::process::CommandExt as _;
            cmd.process_group(0);
        }
        let mut child = cmd.spawn().context("starting sshd")?;
        let stderr = child.stderr.take().context("sshd stderr")?;
        let (tx, rx) = mpsc::channel();
        let log = self.dir.join("sshd.log");
        std::thread::spawn(move || {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .ok();
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(f) = file.as_mut() {
                    use std::io::Write as _;
                    let _ = writeln!(f, "{line}");
                }
                if line.contains("Server listening on") {
                    let _ = tx.send(Ok(()));
                } else if line.contains("fatal") || line.contains("Bad configuration") {
                    let _ = tx.send(Err(line));
                }
            }
        });
        self.child = Some(child);
        match rx.recv_timeout(START_LIMIT) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(line)) => bail!("sshd on {}:{} did not start: {line}", self.addr, self.port),
            Err(_) => bail!(
                "sshd on {}:{} did not say it listens within {START_LIMIT:?}; see {}",
                self.addr,
                self.port,
                self.dir.join("sshd.log").display()
            ),
        }
    }

    /// Stops the target: the listener and every connection it serves (its process group),
    /// as a crashed or powered-off host would.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // A connection's session leaves the group (setsid): kill every descendant too.
            kill_all(&crate::proc::descendants(child.id()));
            kill_group(child.id());
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The target-side `pwsh -sshs` processes serving sessions right now.
    pub fn session_pwsh_pids(&self) -> Vec<u32> {
        let Some(child) = &self.child else {
            return Vec::new();
        };
        crate::proc::descendants(child.id())
            .into_iter()
            .filter(|p| crate::proc::cmdline(*p).is_some_and(|c| c.contains("-sshs")))
            .collect()
    }

    /// The known_hosts line for this target's real host key.
    pub fn known_hosts_line(&self) -> String {
        format!("{} {}", self.host_spec(), self.host_key.key_only())
    }

    /// How known_hosts names this target: `[addr]:port`.
    pub fn host_spec(&self) -> String {
        format!("[{}]:{}", self.addr, self.port)
    }

    /// The sshd log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("sshd.log")).unwrap_or_default()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(unix)]
fn kill_group(pid: u32) {
    use nix::sys::signal::{Signal, killpg};
    use nix::unistd::Pid;
    if let Ok(p) = i32::try_from(pid) {
        let _ = killpg(Pid::from_raw(p), Signal::SIGKILL);
    }
}

#[cfg(not(unix))]
fn kill_group(_pid: u32) {}

/// SIGKILL to each of `pids`.
#[cfg(unix)]
pub fn kill_all(pids: &[u32]) {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    for p in pids {
        if let Ok(p) = i32::try_from(*p) {
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
        }
    }
}

#[cfg(unix)]
fn set_mode(p: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

#[cfg(not(unix))]
fn set_mode(_p: &Path, _mode: u32) -> anyhow::Result<()> {
    Ok(())
}

/// A port nothing listens on at `addr` right now.
fn free_port(addr: Ipv4Addr) -> anyhow::Result<u16> {
    let l = TcpListener::bind((addr, 0)).with_context(|| format!("binding {addr}:0"))?;
    Ok(l.local_addr()?.port())
}

/// Writes a known_hosts file holding `lines`.
pub fn write_known_hosts(path: &Path, lines: &[String]) -> anyhow::Result<()> {
    std::fs::write(path, lines.join("\n") + "\n")?;
    Ok(())
}

/// The user the tests log in as: the one running them (sshd only lets a non-root sshd log
/// in as itself).
pub fn current_user() -> String {
    std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .or_else(|| {
            Command::new("id")
                .arg("-un")
                .output()
                .ok()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        })
        .unwrap_or_else(|| "root".to_owned())
}

/// Several sshd targets sharing one coordinator key and one known_hosts file, laid out under
/// `root` the way an inventory next to them names them *relatively*: `root/ssh/coordinator_ed25519`
/// and `root/ssh/known_hosts`. Each host's home (`root/ssh-NAME`) holds `markers/`, `facts.json`
/// and its marker `state/`; its pwsh sees the home as `$env:TOLLGATE_TEST_HOME` (sshd `SetEnv`).
#[derive(Debug)]
pub struct SshFleet {
    pub client: KeyPair,
    pub known_hosts: PathBuf,
    root: PathBuf,
    hosts: std::collections::BTreeMap<String, Sshd>,
}

impl SshFleet {
    /// Starts one sshd per name, on 127.0.0.`first_octet`, .`first_octet + 1`, ...
    pub fn start(
        root: &Path,
        names: &[&str],
        first_octet: u8,
        pwsh: &Path,
        sshd: &Path,
    ) -> anyhow::Result<SshFleet> {
        let ssh_dir = root.join("ssh");
        std::fs::create_dir_all(&ssh_dir)?;
        let client = KeyPair::generate(&ssh_dir.join("coordinator_ed25519"))?;
        let mut hosts = std::collections::BTreeMap::new();
        for (i, name) in names.iter().enumerate() {
            let home = root.join(format!("ssh-{name}"));
            std::fs::create_dir_all(home.join("markers"))?;
            std::fs::write(home.join("facts.json"), r#"{"app_version":"1.0"}"#)?;
            let spec = SshdSpec {
                addr: Ipv4Addr::new(127, 0, 0, first_octet + u8::try_from(i)?),
                authorized: vec![client.public.clone()],
                pwsh: pwsh.to_path_buf(),
                subsystem: "powershell".into(),
                extra: vec![format!("SetEnv TOLLGATE_TEST_HOME={}", home.display())],
            };
            hosts.insert(
                name.to_string(),
                Sshd::start(sshd, &home.join("sshd"), &spec)?,
            );
        }
        let known_hosts = ssh_dir.join("known_hosts");
        let lines: Vec<String> = hosts.values().map(Sshd::known_hosts_line).collect();
        write_known_hosts(&known_hosts, &lines)?;
        Ok(SshFleet {
            client,
            known_hosts,
            root: root.to_path_buf(),
            hosts,
        })
    }

    /// The inventory entry for `name`, with `key_file` and `known_hosts` relative to `root`.
    pub fn inventory_entry(&self, name: &str, role: &str, class: &str) -> anyhow::Result<String> {
        let sshd = self
            .hosts
            .get(name)
            .with_context(|| format!("no ssh host {name}"))?;
        Ok(format!(
            "[[hosts]]\nname = \"{name}\"\nrole = \"{role}\"\nsafety_class = \"{class}\"\n\
             [hosts.transport.psremoting]\nhost_name = \"{addr}\"\nport = {port}\n\
             user = \"{user}\"\nkey_file = \"ssh/coordinator_ed25519\"\n\
             known_hosts = \"ssh/known_hosts\"\nconnect_timeout = \"10s\"\nstate_dir = {state:?}\n",
            addr = sshd.addr,
            port = sshd.port,
            user = current_user(),
            state = self.home(name).join("state"),
        ))
    }

    /// The home of host `name`.
    pub fn home(&self, name: &str) -> PathBuf {
        self.root.join(format!("ssh-{name}"))
    }

    /// The sshd of host `name`.
    pub fn sshd_mut(&mut self, name: &str) -> Option<&mut Sshd> {
        self.hosts.get_mut(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.hosts.keys().map(String::as_str)
    }
}
