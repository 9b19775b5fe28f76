//! What a session needs before it starts a child: the `pwsh` program, the wire to the target,
//! a credential reference, where the target keeps its markers, and the supervision limits.
//! Everything here is checked before anything is spawned.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::SessionError;

/// How the session host reaches its target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PwshMode {
    /// The `local` transport: a runspace inside the session host's own process.
    None,
    /// PowerShell Remoting over WS-Management (`New-PSSession -ComputerName`).
    WinRm(WinRmTarget),
    /// PowerShell Remoting over SSH (`New-PSSession -HostName`).
    Ssh(SshTarget),
}

impl PwshMode {
    /// `none`, `winrm` or `ssh`, as the script's `-Mode` takes it.
    pub fn as_str(&self) -> &'static str {
        match self {
            PwshMode::None => "none",
            PwshMode::WinRm(_) => "winrm",
            PwshMode::Ssh(_) => "ssh",
        }
    }

    /// Whether the steps run inside the session host's own process: then a dead child
    /// means nothing of it can still be running anywhere.
    pub fn is_in_process(&self) -> bool {
        matches!(self, PwshMode::None)
    }
}

/// `New-PSSession -ComputerName` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WinRmTarget {
    pub computer_name: String,
    /// `None`: 5985, or 5986 with `use_ssl`.
    pub port: Option<u16>,
    /// `-UseSSL`: the HTTPS listener. Strongly recommended outside a domain.
    pub use_ssl: bool,
    pub authentication: WinRmAuth,
    /// `-ConfigurationName`, e.g. `PowerShell.7`; `None` is the endpoint's default.
    pub configuration_name: Option<String>,
}

impl WinRmTarget {
    pub fn new(computer_name: impl Into<String>) -> Self {
        WinRmTarget {
            computer_name: computer_name.into(),
            port: None,
            use_ssl: true,
            authentication: WinRmAuth::Default,
            configuration_name: None,
        }
    }
}

/// `-Authentication` of a WinRM session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WinRmAuth {
    #[default]
    Default,
    Negotiate,
    Kerberos,
    Basic,
    CredSsp,
}

impl WinRmAuth {
    pub fn as_str(self) -> &'static str {
        match self {
            WinRmAuth::Default => "Default",
            WinRmAuth::Negotiate => "Negotiate",
            WinRmAuth::Kerberos => "Kerberos",
            WinRmAuth::Basic => "Basic",
            WinRmAuth::CredSsp => "CredSSP",
        }
    }
}

/// `New-PSSession -HostName` settings (key-based; the session host never prompts).
///
/// Whatever is set here, the session host always passes `BatchMode=yes` and
/// `StrictHostKeyChecking=yes`, and `IdentitiesOnly=yes` with a `key_file`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshTarget {
    pub host_name: String,
    pub port: Option<u16>,
    /// `-UserName`; `None` is the ssh client's default.
    pub user: Option<String>,
    /// `-KeyFilePath`, the only key offered; `None` lets the ssh client pick (agent, default
    /// keys).
    pub key_file: Option<PathBuf>,
    /// The known_hosts file used alone (user and global); `None`: the ssh client's defaults.
    pub known_hosts: Option<PathBuf>,
    /// `-Subsystem`; `None`: `powershell`.
    pub subsystem: Option<String>,
    /// Extra `-o` options, already allow-listed by the config.
    pub options: BTreeMap<String, String>,
    /// `ConnectTimeout`, whole seconds.
    pub connect_timeout_secs: Option<u64>,
    /// `ServerAliveInterval`, whole seconds.
    pub keepalive_secs: Option<u64>,
}

impl SshTarget {
    pub fn new(host_name: impl Into<String>) -> Self {
        SshTarget {
            host_name: host_name.into(),
            port: None,
            user: None,
            key_file: None,
            known_hosts: None,
            subsystem: None,
            options: BTreeMap::new(),
            connect_timeout_secs: None,
            keepalive_secs: None,
        }
    }

    /// The `-o` options beyond the fixed ones, as one JSON object for `-SshOptions`.
    fn options_json(&self) -> Result<Option<String>, SessionError> {
        let mut all = self.options.clone();
        if let Some(s) = self.keepalive_secs {
            all.insert("ServerAliveInterval".into(), s.to_string());
        }
        if all.is_empty() {
            return Ok(None);
        }
        for (name, value) in &all {
            check_value(&format!("ssh option {name}"), value)?;
        }
        serde_json::to_string(&all)
            .map(Some)
            .map_err(|e| SessionError::InvalidSettings(format!("ssh options: {e}")))
    }
}

fn path_text<'a>(name: &str, p: &'a Path) -> Result<&'a str, SessionError> {
    p.to_str().ok_or_else(|| {
        SessionError::InvalidSettings(format!("{name} {} is not valid UTF-8", p.display()))
    })
}

/// Restart back-off: the first restart waits `start`, each failure doubles it up to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub start: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            start: Duration::from_millis(100),
            max: Duration::from_secs(5),
        }
    }
}

/// Everything one host's session needs.
#[derive(Debug, Clone)]
pub struct PwshSettings {
    /// The `pwsh` program: a path, or a bare name looked up on `PATH` (`.exe` added on Windows).
    pub pwsh_path: PathBuf,
    pub mode: PwshMode,
    /// `env:NAME` (the variable holds `user:password` or the path of a PSCredential CliXml
    /// file) or `file:PATH` (a CliXml file, or one line `user:password`). WinRM only. Only the
    /// reference is handed to the child; the secret is read by the session host alone.
    pub credential_ref: Option<String>,
    /// Where the target keeps idempotency markers; `None`: `$env:ProgramData\Tollgate` on
    /// Windows, `$XDG_STATE_HOME/tollgate` or `~/.local/state/tollgate` elsewhere.
    pub state_dir: Option<String>,
    /// Where the session-host script is written on this machine; `None`: a private directory
    /// (mode 0700) made under the system temp dir for this session and removed with it.
    pub script_dir: Option<PathBuf>,
    /// Starting the child and opening its session, `hello` included.
    pub connect_timeout: Duration,
    /// A `query` or `cancel` answer.
    pub request_timeout: Duration,
    /// How long after an invocation's own timeout its answer may still come before the child
    /// counts as hung.
    pub answer_margin: Duration,
    pub backoff: Backoff,
    /// Longest line accepted from the child.
    pub max_line_bytes: usize,
}

impl PwshSettings {
    pub fn new(pwsh_path: impl Into<PathBuf>, mode: PwshMode) -> Self {
        PwshSettings {
            pwsh_path: pwsh_path.into(),
            mode,
            credential_ref: None,
            state_dir: None,
            script_dir: None,
            connect_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(15),
            answer_margin: Duration::from_secs(10),
            backoff: Backoff::default(),
            max_line_bytes: super::contract::DEFAULT_MAX_LINE,
        }
    }

    /// The `local` transport with `pwsh` from `PATH`.
    pub fn local() -> Self {
        PwshSettings::new("pwsh", PwshMode::None)
    }

    /// The script's arguments after `-File <script>`, checked.
    pub(crate) fn script_args(&self) -> Result<Vec<OsString>, SessionError> {
        let mut args: Vec<OsString> = vec!["-Mode".into(), self.mode.as_str().into()];
        let mut named = |name: &str, value: &str| -> Result<(), SessionError> {
            check_value(name, value)?;
            args.push(format!("-{name}").into());
            args.push(value.into());
            Ok(())
        };
        match &self.mode {
            PwshMode::None => {}
            PwshMode::WinRm(w) => {
                named("ComputerName", &w.computer_name)?;
                if let Some(p) = w.port {
                    named("Port", &p.to_string())?;
                }
                if w.authentication != WinRmAuth::Default {
                    named("Authentication", w.authentication.as_str())?;
                }
                if let Some(c) = &w.configuration_name {
                    named("ConfigurationName", c)?;
                }
            }
            PwshMode::Ssh(s) => {
                named("HostName", &s.host_name)?;
                if let Some(p) = s.port {
                    named("Port", &p.to_string())?;
                }
                if let Some(u) = &s.user {
                    named("UserName", u)?;
                }
                if let Some(k) = &s.key_file {
                    named("KeyFilePath", path_text("key_file", k)?)?;
                }
                if let Some(k) = &s.known_hosts {
                    named("KnownHostsFile", path_text("known_hosts", k)?)?;
                }
                if let Some(sub) = &s.subsystem {
                    named("Subsystem", sub)?;
                }
                if let Some(t) = s.connect_timeout_secs {
                    named("ConnectTimeoutSec", &t.to_string())?;
                }
                if let Some(json) = s.options_json()? {
                    named("SshOptions", &json)?;
                }
            }
        }
        if let Some(d) = &self.state_dir {
            named("StateDir", d)?;
        }
        if let PwshMode::WinRm(w) = &self.mode
            && w.use_ssl
        {
            args.push("-UseSsl".into());
        }
        Ok(args)
    }

    /// The credential reference to hand to the child, checked to resolve (without reading
    /// the secret). `None` when there is none or the mode takes none.
    pub(crate) fn credential(&self) -> Result<Option<CredentialRef>, SessionError> {
        let Some(text) = &self.credential_ref else {
            return Ok(None);
        };
        if !matches!(self.mode, PwshMode::WinRm(_)) {
            return Err(SessionError::InvalidSettings(format!(
                "credential_ref is only used by WinRM sessions, not by mode {}",
                self.mode.as_str()
            )));
        }
        let r = CredentialRef::parse(text)?;
        r.check_available()?;
        Ok(Some(r))
    }
}

/// Rejects values the script could misread as a parameter, or that could break a command line.
fn check_value(name: &str, value: &str) -> Result<(), SessionError> {
    let bad = if value.is_empty() {
        Some("is empty")
    } else if value.starts_with('-') {
        Some("starts with '-'")
    } else if value.chars().any(char::is_control) {
        Some("contains a control character")
    } else {
        None
    };
    match bad {
        Some(why) => Err(SessionError::InvalidSettings(format!(
            "{name} {value:?} {why}"
        ))),
        None => Ok(()),
    }
}

/// A reference to a credential; never the credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialRef {
    /// An environment variable of the coordinator.
    Env(String),
    /// A file on the coordinator.
    File(PathBuf),
}

impl CredentialRef {
    pub fn parse(text: &str) -> Result<Self, SessionError> {
        if let Some(name) = text.strip_prefix("env:") {
            let ok =
                !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !ok {
                return Err(SessionError::InvalidSettings(format!(
                    "credential_ref {text:?}: an environment variable name is letters, digits and '_'"
                )));
            }
            return Ok(CredentialRef::Env(name.to_string()));
        }
        if let Some(path) = text.strip_prefix("file:")
            && !path.is_empty()
        {
            return Ok(CredentialRef::File(PathBuf::from(path)));
        }
        Err(SessionError::InvalidSettings(format!(
            "credential_ref {text:?} must be env:NAME or file:PATH"
        )))
    }

    /// Checks the reference resolves, without reading the secret.
    pub fn check_available(&self) -> Result<(), SessionError> {
        match self {
            CredentialRef::Env(name) => match std::env::var_os(name) {
                Some(v) if !v.is_empty() => Ok(()),
                _ => Err(SessionError::CredentialUnavailable(format!(
                    "environment variable {name} named by credential_ref is not set"
                ))),
            },
            CredentialRef::File(path) => {
                if path.is_file() {
                    Ok(())
                } else {
                    Err(SessionError::CredentialUnavailable(format!(
                        "credential file {} named by credential_ref does not exist",
                        path.display()
                    )))
                }
            }
        }
    }

    /// The reference as the child receives it in `TOLLGATE_CREDENTIAL_REF`.
    pub fn as_env_value(&self) -> OsString {
        match self {
            CredentialRef::Env(name) => format!("env:{name}").into(),
            CredentialRef::File(path) => {
                let mut v = OsString::from("file:");
                v.push(path.as_os_str());
                v
            }
        }
    }
}

/// Finds the `pwsh` program: an explicit path must be an executable file; a bare name is
/// looked up on `PATH`. A miss names what was looked for.
pub fn resolve_program(configured: &Path) -> Result<PathBuf, SessionError> {
    let bare = configured.components().count() == 1 && configured.parent() == Some(Path::new(""));
    if !bare {
        return if is_executable(configured) {
            Ok(configured.to_path_buf())
        } else {
            Err(SessionError::PwshMissing {
                path: configured.to_path_buf(),
                detail: format!(
                    "{} does not exist or is not an executable file (pwsh_path)",
                    configured.display()
                ),
            })
        };
    }
    let mut names = vec![configured.as_os_str().to_owned()];
    if cfg!(windows) && configured.extension().is_none() {
        let mut exe = configured.as_os_str().to_owned();
        exe.push(".exe");
        names.insert(0, exe);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .flat_map(|dir| names.iter().map(move |n| dir.join(n)))
        .find(|p| is_executable(p))
        .ok_or_else(|| SessionError::PwshMissing {
            path: configured.to_path_buf(),
            detail: format!("{} was not found on PATH", configured.display()),
        })
}

#[cfg(unix)]
fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(not(unix))]
fn is_executable(p: &Path) -> bool {
    p.is_file()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn winrm_arguments_name_every_setting() {
        let mut w = WinRmTarget::new("db1.example.org");
        w.port = Some(5986);
        w.authentication = WinRmAuth::Negotiate;
        w.configuration_name = Some("PowerShell.7".into());
        let mut s = PwshSettings::new("pwsh", PwshMode::WinRm(w));
        s.state_dir = Some(r"D:\Tollgate".into());
        let args: Vec<String> = s
            .script_args()
            .unwrap()
            .into_iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args,
            [
                "-Mode",
                "winrm",
                "-ComputerName",
                "db1.example.org",
                "-Port",
                "5986",
                "-Authentication",
                "Negotiate",
                "-ConfigurationName",
                "PowerShell.7",
                "-StateDir",
                r"D:\Tollgate",
                "-UseSsl"
            ]
        );
    }

    #[test]
    fn ssh_arguments_name_every_setting() {
        let mut t = SshTarget::new("web1.example.org");
        t.port = Some(2222);
        t.user = Some("tollgate".into());
        t.key_file = Some("/etc/tollgate/ssh/id_ed25519".into());
        t.known_hosts = Some("/etc/tollgate/ssh/known_hosts".into());
        t.subsystem = Some("powershell7".into());
        t.connect_timeout_secs = Some(7);
        t.keepalive_secs = Some(15);
        t.options
            .insert("ProxyJump".into(), "bastion.example.org".into());
        let s = PwshSettings::new("pwsh", PwshMode::Ssh(t));
        let args: Vec<String> = s
            .script_args()
            .unwrap()
            .into_iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args,
            [
                "-Mode",
                "ssh",
                "-HostName",
                "web1.example.org",
                "-Port",
                "2222",
                "-UserName",
                "tollgate",
                "-KeyFilePath",
                "/etc/tollgate/ssh/id_ed25519",
                "-KnownHostsFile",
                "/etc/tollgate/ssh/known_hosts",
                "-Subsystem",
                "powershell7",
                "-ConnectTimeoutSec",
                "7",
                "-SshOptions",
                r#"{"ProxyJump":"bastion.example.org","ServerAliveInterval":"15"}"#,
            ]
        );
    }

    #[test]
    fn values_that_could_be_misread_are_refused() {
        for bad in ["", "-Mode", "a\nb"] {
            let s = PwshSettings::new("pwsh", PwshMode::Ssh(SshTarget::new(bad)));
            let e = s.script_args().unwrap_err();
            assert!(
                matches!(e, SessionError::InvalidSettings(_)),
                "{bad:?}: {e}"
            );
            assert!(e.to_string().contains("HostName"));
        }
    }

    #[test]
    fn credential_references_are_checked_not_read() {
        assert_eq!(
            CredentialRef::parse("env:TOLLGATE_CRED_DB1").unwrap(),
            CredentialRef::Env("TOLLGATE_CRED_DB1".into())
        );
        assert!(CredentialRef::parse("env:A-B").is_err());
        assert!(CredentialRef::parse("vault:x").is_err());
        assert!(CredentialRef::parse("file:").is_err());
        let e = CredentialRef::Env("TOLLGATE_SURELY_UNSET_1F3A".into())
            .check_available()
            .unwrap_err();
        assert!(matches!(e, SessionError::CredentialUnavailable(_)));
        assert!(e.to_string().contains("TOLLGATE_SURELY_UNSET_1F3A"));
        let mut s = PwshSettings::local();
        s.credential_ref = Some("env:X".into());
        assert!(matches!(
            s.credential(),
            Err(SessionError::InvalidSettings(_))
        ));
    }

    #[test]
    fn missing_program_names_what_was_looked_for() {
        let e = resolve_program(Path::new("/nonexistent/dir/pwsh")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/dir/pwsh"), "{e}");
        let e = resolve_program(Path::new("tollgate-no-such-pwsh-7f2c")).unwrap_err();
        assert!(e.to_string().contains("tollgate-no-such-pwsh-7f2c"), "{e}");
        assert!(e.to_string().contains("PATH"), "{e}");
    }
}
