//! The PowerShell transports (`psremoting` and `local`): one supervised `pwsh` child per host.
//!
//! The child runs `session_host.ps1` (shipped inside the binary) as
//! `pwsh -NoLogo -NoProfile -NonInteractive -File <script> -Mode none|winrm|ssh ...`. The script
//! opens one session to the target (WinRM `New-PSSession -ComputerName`, SSH `-HostName`, or a
//! runspace of its own for `none`, the `local` transport) and serves the JSON-lines contract of
//! [`contract`] on stdin/stdout. Steps run on the target; so do their idempotency markers, one
//! per key under the target's state directory: a finished key answers its stored result without
//! running, a key left `started` answers `Uncertain`.
//!
//! [`PwshSession`] supervises the child. It starts it lazily, says `hello` (contract `v: 1`)
//! and waits until the session is open. A child that exits, hangs past a deadline, or writes
//! one line that is not the contract is killed with its whole process tree, the session is
//! marked broken, and the next call starts a new child after an exponential back-off.
//! Work in flight never ends untyped: after a break the session asks the (new) child what the
//! key's marker says, and answers its stored result, or `Uncertain` (never a silent re-run).
//!
//! Credentials: the child gets only the *reference* (`TOLLGATE_CREDENTIAL_REF=env:NAME` or
//! `file:PATH`); the script resolves it, removes it from its own environment, and never prints
//! it. Nothing here logs or returns a secret.
//!
//! How outcomes map (for the `Host` actor):
//!
//! | what happened | answer |
//! |---|---|
//! | `pwsh` not found at `pwsh_path` | `execute`: `ExecStatus::CapabilityMismatch` naming the path; others: [`SessionError::PwshMissing`] |
//! | the target refused the credential | [`SessionError::AuthFailed`] (not transient) |
//! | the target cannot be reached, nothing sent | [`SessionError::Unreachable`] (transient) |
//! | the session broke during a probe or query | [`SessionError::Lost`] (transient) |
//! | the child wrote garbage | [`SessionError::Protocol`] (the child is restarted) |
//! | no answer in time | [`SessionError::Timeout`] (the child is killed and restarted) |
//! | the script threw | `ExecStatus::Exited { code: 1 }`, the record in [`PwshSession::last_script_error`] and on stderr |
//! | any break while a step was in flight | its marker's stored result, or `ExecStatus::Uncertain`; in `none` mode a key never started is [`SessionError::Unreachable`] |

pub mod answers;
mod child;
pub mod contract;
mod settings;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tollgate_protocol::Shell;
use tollgate_protocol::agent::{
    ExecResult, ExecStatus, ExecuteRequest, IdempotencyStatus, OutputChunk, ProbeReport,
    ProbeRequest, Stream, fingerprint,
};
use tollgate_protocol::outcome::ReasonCode;

use child::{ChildProc, Event, Launch};
use contract::{CONTRACT_VERSION, FailCode, Request, Response, TextStream};

pub use contract::ScriptError;
pub use settings::{
    Backoff, CredentialRef, PwshMode, PwshSettings, SshTarget, WinRmAuth, WinRmTarget,
    resolve_program,
};

/// The session-host script, as shipped.
pub const SESSION_HOST_SCRIPT: &str = include_str!("session_host.ps1");

/// The environment variable through which the child receives the credential reference.
pub const CREDENTIAL_REF_ENV: &str = "TOLLGATE_CREDENTIAL_REF";

/// Why a session could not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// The `pwsh` program is not there; nothing was started. A capability mismatch for the host.
    #[error("pwsh not found: {detail}")]
    PwshMissing { path: PathBuf, detail: String },
    /// The settings cannot make a valid command line; nothing was started.
    #[error("invalid pwsh session settings: {0}")]
    InvalidSettings(String),
    /// The session host script could not be written on this machine; nothing was started.
    #[error("cannot prepare the session host: {0}")]
    Setup(String),
    /// The credential reference does not resolve; nothing was sent to the target.
    #[error("credential unavailable: {0}")]
    CredentialUnavailable(String),
    /// The target refused the credential. Not transient: retrying will not fix it.
    #[error("authentication failed: {0}")]
    AuthFailed(String),
    /// The target could not be reached and nothing was sent (or nothing ran): safe to retry.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// The request was sent and the session broke before its answer: the outcome is unknown.
    #[error("session lost: {0}")]
    Lost(String),
    /// The child wrote something that is not the contract; it was killed.
    #[error("session host broke the contract: {0}")]
    Protocol(String),
    /// No answer within the deadline.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The idempotency key was used before for a different request; nothing ran.
    #[error("idempotency conflict: {0}")]
    IdempotencyConflict(String),
    /// The probe script failed.
    #[error("probe failed: {0}")]
    ProbeFailed(String),
    /// The probe answered something that is not facts.
    #[error("probe output is not facts: {0}")]
    ProbeMalformed(String),
    /// The session host refused the request (`busy`, `bad_request`, `unsupported_version`,
    /// `internal`, ...).
    #[error("session host refused the request ({code}): {message}")]
    Refused { code: String, message: String },
}

impl SessionError {
    /// Transient failures may be retried (a new child is started when needed); others need a
    /// person: a missing program, bad settings, a refused credential, a broken contract.
    pub fn is_transient(&self) -> bool {
        match self {
            SessionError::Unreachable(_) | SessionError::Lost(_) | SessionError::Timeout(_) => true,
            SessionError::Refused { code, .. } => code == FailCode::Busy.as_str(),
            _ => false,
        }
    }

    /// The reason code this failure suggests (the caller may refine it, e.g. `ProbeTimeout`).
    pub fn reason(&self) -> ReasonCode {
        match self {
            SessionError::PwshMissing { .. } => ReasonCode::ShellUnavailable,
            SessionError::InvalidSettings(_) | SessionError::Setup(_) => ReasonCode::SpawnFailed,
            SessionError::CredentialUnavailable(_) | SessionError::AuthFailed(_) => {
                ReasonCode::AuthFailed
            }
            SessionError::Unreachable(_) => ReasonCode::Unreachable,
            SessionError::Lost(_) | SessionError::Protocol(_) => ReasonCode::SessionBroken,
            SessionError::Timeout(_) => ReasonCode::TimedOut,
            SessionError::IdempotencyConflict(_) => ReasonCode::SpawnFailed,
            SessionError::ProbeFailed(_) => ReasonCode::ProbeFailed,
            SessionError::ProbeMalformed(_) => ReasonCode::MalformedFacts,
            SessionError::Refused { code, .. } if code == FailCode::UnsupportedVersion.as_str() => {
                ReasonCode::VersionMismatch
            }
            SessionError::Refused { .. } => ReasonCode::SpawnFailed,
        }
    }
}

/// The state of a session, for status displays and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionHealth {
    /// No child yet.
    NotStarted,
    /// A child is running and its session is open.
    Ready,
    /// The last child failed or was killed; the next call starts a new one after the back-off.
    Broken { reason: String },
}

/// Cancels the invocation in flight on a session, from outside the call that runs it.
#[derive(Debug, Clone)]
pub struct Canceller {
    inflight: Arc<Mutex<Option<String>>>,
    tx: mpsc::UnboundedSender<String>,
}

impl Canceller {
    /// Asks for `key` to be cancelled. True if `key` is the invocation in flight (the request
    /// is then on its way to the target); false if nothing with that key runs here.
    pub fn cancel(&self, key: &str) -> bool {
        let Ok(current) = self.inflight.lock() else {
            return false;
        };
        current.as_deref() == Some(key) && self.tx.send(key.to_string()).is_ok()
    }
}

/// The session-host script on disk.
#[derive(Debug)]
struct ScriptFile {
    path: PathBuf,
    /// A directory this session made for it, removed with the session.
    private_dir: Option<PathBuf>,
}

impl Drop for ScriptFile {
    fn drop(&mut self) {
        if let Some(d) = &self.private_dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// Why a child counts as broken.
#[derive(Debug)]
enum Broken {
    Exited(String),
    Garbage(String),
    Hung(Duration),
}

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Broken::Exited(d) => write!(f, "the session host {d}"),
            Broken::Garbage(g) => write!(f, "the session host broke the contract: {g}"),
            Broken::Hung(d) => write!(f, "the session host did not answer within {d:?}"),
        }
    }
}

impl Broken {
    /// The error for a request that was sent (its answer never came).
    fn after_send(&self) -> SessionError {
        match self {
            Broken::Exited(_) => SessionError::Lost(self.to_string()),
            Broken::Garbage(g) => SessionError::Protocol(g.clone()),
            Broken::Hung(d) => SessionError::Timeout(*d),
        }
    }
}

/// What `hello` told about the child.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloInfo {
    pub software: String,
    /// The `pwsh` version running the session host (on this machine).
    pub ps_version: String,
    pub mode: String,
    /// A fresh id per child; markers record which child started them.
    pub instance: String,
}

enum Step {
    Event(Event),
    Cancel(String),
    Hung,
}

/// One host's supervised `pwsh` child. Calls are serialized by `&mut self`; to cancel an
/// invocation while it runs, use a [`Canceller`].
#[derive(Debug)]
pub struct PwshSession {
    host: String,
    settings: PwshSettings,
    child: Option<ChildProc>,
    hello: Option<HelloInfo>,
    health: SessionHealth,
    backoff: Duration,
    next_attempt: Option<Instant>,
    next_id: u64,
    spawns: u64,
    script: Option<ScriptFile>,
    /// `cancel` requests sent whose answers may still come after their invocation ended.
    stray_cancels: Vec<u64>,
    inflight: Arc<Mutex<Option<String>>>,
    cancel_tx: mpsc::UnboundedSender<String>,
    cancel_rx: mpsc::UnboundedReceiver<String>,
    last_script_error: Option<ScriptError>,
}

impl PwshSession {
    /// A session for `host`; nothing is started until the first call.
    pub fn new(host: String, settings: PwshSettings) -> Self {
        let (cancel_tx, cancel_rx) = mpsc::unbounded_channel();
        PwshSession {
            host,
            backoff: settings.backoff.start,
            settings,
            child: None,
            hello: None,
            health: SessionHealth::NotStarted,
            next_attempt: None,
            next_id: 1,
            spawns: 0,
            script: None,
            stray_cancels: Vec::new(),
            inflight: Arc::new(Mutex::new(None)),
            cancel_tx,
            cancel_rx,
            last_script_error: None,
        }
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn settings(&self) -> &PwshSettings {
        &self.settings
    }

    pub fn health(&self) -> &SessionHealth {
        &self.health
    }

    /// The running child's process id.
    pub fn child_pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(ChildProc::pid)
    }

    /// How many children this session has started.
    pub fn spawns(&self) -> u64 {
        self.spawns
    }

    /// The wait before the next start after a failure.
    pub fn backoff(&self) -> Duration {
        self.backoff
    }

    /// What the current child said in `hello`.
    pub fn hello(&self) -> Option<&HelloInfo> {
        self.hello.as_ref()
    }

    /// The terminating error of the last `execute`, if its script threw.
    pub fn last_script_error(&self) -> Option<&ScriptError> {
        self.last_script_error.as_ref()
    }

    pub fn canceller(&self) -> Canceller {
        Canceller {
            inflight: self.inflight.clone(),
            tx: self.cancel_tx.clone(),
        }
    }

    /// Closes the session: the child closes its PSSession and exits (it is killed if it does
    /// not within `limit`).
    pub async fn close(&mut self, limit: Duration) {
        if let Some(mut c) = self.child.take() {
            c.close(limit).await;
        }
        self.hello = None;
        self.health = SessionHealth::NotStarted;
    }

    /// Collects facts from the target: built-ins (`host.name`, `os.family`, `os.arch`,
    /// `pwsh.present`, `pwsh.version`, `pwsh.edition`, `boot.id`, `transport.kind`,
    /// `transport.mode`) and the probe script's JSON object as `probe.KEY`, fingerprinted.
    /// Bounded by `timeout`, starting the child included.
    pub async fn probe(
        &mut self,
        req: ProbeRequest,
        timeout: Duration,
    ) -> Result<ProbeReport, SessionError> {
        let deadline = Instant::now() + timeout;
        self.ensure_ready(deadline).await?;
        // Leave the script room to answer "timed out" itself before the child counts as hung.
        let remaining = deadline.saturating_duration_since(Instant::now());
        let script_ms = req.timeout_ms.min(duration_ms(remaining) * 4 / 5).max(1);
        let wants_script = req.script.is_some();
        let (shell, script) = match req.script {
            Some(s) => (Some(s.shell), Some(s.body)),
            None => (None, None),
        };
        let id = self.take_id();
        let wire = Request::Probe {
            id,
            shell,
            script,
            timeout_ms: script_ms,
        };
        self.send(&wire, deadline)
            .await
            .map_err(|b| b.after_send())?;
        loop {
            let resp = match self.recv(deadline).await {
                Ok(r) => r,
                Err(b) => return Err(self.broke_after_send(b, timeout).await),
            };
            match resp {
                Response::Probe {
                    id: r,
                    facts,
                    volatile,
                    script_output,
                } if r == id => return self.report(facts, volatile, script_output, wants_script),
                Response::Fail {
                    id: r,
                    code,
                    message,
                } if r == id => return Err(self.failed(code, message, timeout).await),
                Response::Output { id: r, .. }
                | Response::Error { id: r, .. }
                | Response::Progress { id: r, .. }
                    if r == id => {}
                other => return Err(self.unexpected(&other, "probe").await),
            }
        }
    }

    /// Runs a step on the target; output chunks are handed to `on_output` in order. A key
    /// that finished before answers its stored result (`replayed`) without running; a key
    /// reused for another request is [`SessionError::IdempotencyConflict`].
    pub async fn execute(
        &mut self,
        req: ExecuteRequest,
        mut on_output: impl FnMut(OutputChunk),
    ) -> Result<ExecResult, SessionError> {
        self.last_script_error = None;
        let connect_deadline = Instant::now() + self.settings.connect_timeout;
        match self.ensure_ready(connect_deadline).await {
            Ok(()) => {}
            Err(SessionError::PwshMissing { detail, .. }) => {
                return Ok(ExecResult {
                    idempotency_key: req.idempotency_key,
                    status: ExecStatus::CapabilityMismatch {
                        shell: Shell::Pwsh,
                        detail: format!("pwsh not found: {detail}"),
                    },
                    duration_ms: 0,
                    stdout_truncated: false,
                    stderr_truncated: false,
                    replayed: false,
                });
            }
            Err(e) => return Err(e),
        }
        while self.cancel_rx.try_recv().is_ok() {}
        self.set_inflight(Some(req.idempotency_key.clone()));
        let result = self.invoke(req, &mut on_output).await;
        self.set_inflight(None);
        result
    }

    /// Cancels `key` if it runs on this session now. With `&mut self` nothing of ours can be
    /// in flight, so this asks the child only to keep the contract honest; use a
    /// [`Canceller`] to cancel a running `execute`.
    pub async fn cancel(&mut self, key: &str) -> Result<bool, SessionError> {
        let alive = match self.child.as_mut() {
            None => false,
            Some(c) => c.exited().is_none(),
        };
        if !alive {
            return Ok(false);
        }
        let timeout = self.settings.request_timeout;
        let deadline = Instant::now() + timeout;
        let id = self.take_id();
        let wire = Request::Cancel {
            id,
            key: key.to_string(),
        };
        if let Err(b) = self.send(&wire, deadline).await {
            return Err(self.broke_after_send(b, timeout).await);
        }
        match self.recv(deadline).await {
            Ok(Response::Cancel { id: r, found }) if r == id => Ok(found),
            Ok(Response::Fail {
                id: r,
                code,
                message,
            }) if r == id => Err(self.failed(code, message, timeout).await),
            Ok(other) => Err(self.unexpected(&other, "cancel").await),
            Err(b) => Err(self.broke_after_send(b, timeout).await),
        }
    }

    /// What the target's marker says about `key`. Starts a child if needed.
    pub async fn query(&mut self, key: &str) -> Result<IdempotencyStatus, SessionError> {
        let deadline =
            Instant::now() + self.settings.connect_timeout + self.settings.request_timeout;
        self.query_until(key, deadline).await
    }

    // ----------------------------------------------------------------------------------------

    fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    fn set_inflight(&self, key: Option<String>) {
        if let Ok(mut k) = self.inflight.lock() {
            *k = key;
        }
    }

    /// Makes sure a child with an open session is there, starting one (after the back-off)
    /// if not. A child that died or wrote anything while idle is replaced first.
    async fn ensure_ready(&mut self, deadline: Instant) -> Result<(), SessionError> {
        if let Some(reason) = self.idle_problem().await {
            self.break_session(reason).await;
        }
        if self.child.is_some() {
            return Ok(());
        }
        if let Some(at) = self.next_attempt {
            let now = Instant::now();
            if at > deadline {
                let why = match &self.health {
                    SessionHealth::Broken { reason } => reason.clone(),
                    _ => "an earlier failure".to_string(),
                };
                return Err(SessionError::Unreachable(format!(
                    "{}: backing off for {:?} after: {why}",
                    self.host,
                    at - now
                )));
            }
            if at > now {
                tokio::time::sleep_until(at).await;
            }
        }
        match self.start(deadline).await {
            Ok(hello) => {
                self.hello = Some(hello);
                self.health = SessionHealth::Ready;
                self.backoff = self.settings.backoff.start;
                self.next_attempt = None;
                Ok(())
            }
            Err(e) => {
                if let Some(mut c) = self.child.take() {
                    c.kill().await;
                }
                self.mark_broken(e.to_string());
                Err(e)
            }
        }
    }

    /// Why the idle child cannot be used, if it cannot.
    async fn idle_problem(&mut self) -> Option<String> {
        let child = self.child.as_mut()?;
        loop {
            match child.pending_event() {
                None => break,
                Some(Event::Message(Response::Cancel { id, .. }))
                    if self.stray_cancels.contains(&id) =>
                {
                    self.stray_cancels.retain(|c| *c != id);
                }
                Some(Event::Message(r)) => {
                    return Some(format!(
                        "the session host said {} (for request {}) while idle",
                        r.kind(),
                        r.id()
                    ));
                }
                Some(Event::Garbage(g)) => {
                    return Some(format!(
                        "the session host broke the contract while idle: {g}"
                    ));
                }
                Some(Event::Eof) => {
                    return Some(format!("the session host {}", child.describe_exit().await));
                }
            }
        }
        if child.exited().is_some() {
            return Some(format!("the session host {}", child.describe_exit().await));
        }
        None
    }

    /// Starts a child and waits for its `hello`.
    async fn start(&mut self, deadline: Instant) -> Result<HelloInfo, SessionError> {
        let program = resolve_program(&self.settings.pwsh_path)?;
        let tail = self.settings.script_args()?;
        let credential = self.settings.credential()?;
        let script = self.script_path()?;
        let mut args: Vec<std::ffi::OsString> =
            ["-NoLogo", "-NoProfile", "-NonInteractive", "-File"]
                .iter()
                .map(Into::into)
                .collect();
        args.push(script.into_os_string());
        args.extend(tail);
        let env = credential
            .map(|c| vec![(CREDENTIAL_REF_ENV, c.as_env_value())])
            .unwrap_or_default();
        let child = ChildProc::spawn(Launch {
            program: &program,
            args,
            env,
            env_remove: vec![CREDENTIAL_REF_ENV],
            max_line: self.settings.max_line_bytes,
        })
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied => {
                SessionError::PwshMissing {
                    path: program.clone(),
                    detail: format!("cannot start {}: {e}", program.display()),
                }
            }
            _ => SessionError::Unreachable(format!(
                "{}: cannot start {}: {e}",
                self.host,
                program.display()
            )),
        })?;
        self.spawns += 1;
        tracing::debug!(host = %self.host, pid = ?child.pid(), mode = self.settings.mode.as_str(), "pwsh session host started");
        self.child = Some(child);
        let connect = self.settings.connect_timeout;
        let deadline = deadline.min(Instant::now() + connect);
        let limit = deadline.saturating_duration_since(Instant::now());
        let id = self.take_id();
        let hello = Request::Hello {
            id,
            v: CONTRACT_VERSION,
            software: format!("tollgate {}", env!("CARGO_PKG_VERSION")),
        };
        let before_ready = |b: Broken| match b {
            Broken::Exited(_) => {
                SessionError::Unreachable(format!("{b} before its session was open"))
            }
            Broken::Garbage(g) => SessionError::Protocol(g),
            Broken::Hung(_) => SessionError::Timeout(limit),
        };
        self.send(&hello, deadline).await.map_err(before_ready)?;
        match self.recv(deadline).await.map_err(before_ready)? {
            Response::Hello {
                id: r,
                v,
                software,
                ps_version,
                mode,
                instance,
            } if r == id => {
                if v != CONTRACT_VERSION {
                    return Err(SessionError::Protocol(format!(
                        "the session host speaks contract v{v}, this coordinator v{CONTRACT_VERSION}"
                    )));
                }
                Ok(HelloInfo {
                    software,
                    ps_version,
                    mode,
                    instance,
                })
            }
            Response::Fail {
                id: r,
                code,
                message,
            } if r == id => Err(fail_error(&self.host, code, message, limit)),
            other => Err(SessionError::Protocol(format!(
                "expected the answer to hello ({id}), got {} for request {}",
                other.kind(),
                other.id()
            ))),
        }
    }

    /// Writes the script where the child can run it (once; checked before every start).
    fn script_path(&mut self) -> Result<PathBuf, SessionError> {
        if let Some(s) = &self.script
            && std::fs::read(&s.path).is_ok_and(|b| b == SESSION_HOST_SCRIPT.as_bytes())
        {
            return Ok(s.path.clone());
        }
        let setup = |what: &str, p: &Path, e: std::io::Error| {
            SessionError::Setup(format!("cannot {what} {}: {e}", p.display()))
        };
        let (dir, private) = match &self.settings.script_dir {
            Some(d) => {
                std::fs::create_dir_all(d).map_err(|e| setup("create", d, e))?;
                (d.clone(), false)
            }
            None => match &self.script {
                Some(ScriptFile {
                    private_dir: Some(d),
                    ..
                }) => {
                    if !d.is_dir() {
                        make_private_dir(d).map_err(|e| setup("create", d, e))?;
                    }
                    (d.clone(), false)
                }
                _ => {
                    let d = std::env::temp_dir()
                        .join(format!("tollgate-pwsh-{}", uuid::Uuid::new_v4().simple()));
                    make_private_dir(&d).map_err(|e| setup("create", &d, e))?;
                    (d, true)
                }
            },
        };
        let sha = hex::encode(Sha256::digest(SESSION_HOST_SCRIPT.as_bytes()));
        let path = dir.join(format!("tollgate-session-host-{}.ps1", &sha[..12]));
        let tmp = dir.join(format!(".{}.tmp", uuid::Uuid::new_v4().simple()));
        std::fs::write(&tmp, SESSION_HOST_SCRIPT).map_err(|e| setup("write", &tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            setup("write", &path, e)
        })?;
        let private_dir = if private {
            Some(dir)
        } else {
            self.script.take().and_then(|mut s| s.private_dir.take())
        };
        self.script = Some(ScriptFile {
            path: path.clone(),
            private_dir,
        });
        Ok(path)
    }

    async fn send(&mut self, req: &Request, deadline: Instant) -> Result<(), Broken> {
        let line = contract::encode_request(req).map_err(|e| Broken::Garbage(e.to_string()))?;
        let Some(child) = self.child.as_mut() else {
            return Err(Broken::Exited("is not running".into()));
        };
        let limit = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout_at(deadline, child.write_line(&line)).await {
            Err(_) => Err(Broken::Hung(limit)),
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Broken::Exited(format!(
                "stopped reading its input ({e}) and {}",
                child.describe_exit().await
            ))),
        }
    }

    /// The next response, skipping late answers to `cancel`s of finished invocations.
    async fn recv(&mut self, deadline: Instant) -> Result<Response, Broken> {
        loop {
            let Some(child) = self.child.as_mut() else {
                return Err(Broken::Exited("is not running".into()));
            };
            let limit = deadline.saturating_duration_since(Instant::now());
            let event = match tokio::time::timeout_at(deadline, child.next_event()).await {
                Err(_) => return Err(Broken::Hung(limit)),
                Ok(e) => e,
            };
            match event {
                Event::Message(Response::Cancel { id, .. }) if self.stray_cancels.contains(&id) => {
                    self.stray_cancels.retain(|c| *c != id);
                }
                Event::Message(r) => return Ok(r),
                Event::Garbage(g) => return Err(Broken::Garbage(g)),
                Event::Eof => return Err(Broken::Exited(child.describe_exit().await)),
            }
        }
    }

    fn mark_broken(&mut self, reason: String) {
        tracing::warn!(host = %self.host, %reason, "pwsh session broken");
        self.health = SessionHealth::Broken { reason };
        self.hello = None;
        self.stray_cancels.clear();
        self.next_attempt = Some(Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(self.settings.backoff.max);
    }

    /// Kills the child (and its tree) and marks the session broken.
    async fn break_session(&mut self, reason: String) {
        if let Some(mut c) = self.child.take() {
            c.kill().await;
        }
        self.mark_broken(reason);
    }

    async fn broke_after_send(&mut self, b: Broken, timeout: Duration) -> SessionError {
        let e = match b {
            Broken::Hung(_) => SessionError::Timeout(timeout),
            other => other.after_send(),
        };
        self.break_session(e.to_string()).await;
        e
    }

    async fn unexpected(&mut self, r: &Response, waiting_for: &str) -> SessionError {
        let e = SessionError::Protocol(format!(
            "got {} for request {} while waiting for the answer to {waiting_for}",
            r.kind(),
            r.id()
        ));
        self.break_session(e.to_string()).await;
        e
    }

    /// A `fail` answer: the session is broken if the session host said so.
    async fn failed(&mut self, code: FailCode, message: String, timeout: Duration) -> SessionError {
        let e = fail_error(&self.host, code, message, timeout);
        if code == FailCode::SessionLost {
            self.break_session(e.to_string()).await;
        }
        e
    }

    async fn invoke(
        &mut self,
        req: ExecuteRequest,
        on_output: &mut impl FnMut(OutputChunk),
    ) -> Result<ExecResult, SessionError> {
        let key = req.idempotency_key.clone();
        let deadline =
            Instant::now() + Duration::from_millis(req.timeout_ms) + self.settings.answer_margin;
        let id = self.take_id();
        let wire = Request::Invoke {
            id,
            key: key.clone(),
            request_sha: request_sha(&req),
            shell: req.shell,
            script: req.script,
            env: req.env,
            working_dir: req.working_dir,
            timeout_ms: req.timeout_ms,
        };
        let sent_at = Instant::now();
        if let Err(b) = self.send(&wire, deadline).await {
            return self.recover(&key, b.to_string(), sent_at).await;
        }
        let mut seq = 0u64;
        let mut cancels: Vec<u64> = Vec::new();
        loop {
            let step = {
                let Some(child) = self.child.as_mut() else {
                    return self
                        .recover(&key, "the session host is gone".into(), sent_at)
                        .await;
                };
                let cancel_rx = &mut self.cancel_rx;
                tokio::select! {
                    ev = child.next_event() => Step::Event(ev),
                    Some(k) = cancel_rx.recv() => Step::Cancel(k),
                    _ = tokio::time::sleep_until(deadline) => Step::Hung,
                }
            };
            let resp = match step {
                Step::Cancel(k) => {
                    if k == key {
                        let cid = self.take_id();
                        cancels.push(cid);
                        let line = Request::Cancel {
                            id: cid,
                            key: key.clone(),
                        };
                        if let Err(b) = self.send(&line, deadline).await {
                            return self.recover(&key, b.to_string(), sent_at).await;
                        }
                    }
                    continue;
                }
                Step::Hung => {
                    let limit = Duration::from_millis(req.timeout_ms) + self.settings.answer_margin;
                    return self
                        .recover(&key, Broken::Hung(limit).to_string(), sent_at)
                        .await;
                }
                Step::Event(Event::Garbage(g)) => {
                    return self
                        .recover(&key, Broken::Garbage(g).to_string(), sent_at)
                        .await;
                }
                Step::Event(Event::Eof) => {
                    let how = match self.child.as_mut() {
                        Some(c) => c.describe_exit().await,
                        None => "is gone".to_string(),
                    };
                    return self
                        .recover(&key, Broken::Exited(how).to_string(), sent_at)
                        .await;
                }
                Step::Event(Event::Message(r)) => r,
            };
            match resp {
                Response::Output {
                    id: r,
                    stream,
                    data,
                } if r == id => {
                    let stream = match stream {
                        TextStream::Stdout => Stream::Stdout,
                        TextStream::Stderr => Stream::Stderr,
                    };
                    on_output(OutputChunk {
                        seq,
                        stream,
                        data: data.into_bytes(),
                    });
                    seq += 1;
                }
                Response::Error { id: r, data, .. } if r == id => {
                    on_output(OutputChunk {
                        seq,
                        stream: Stream::Stderr,
                        data: data.into_bytes(),
                    });
                    seq += 1;
                }
                Response::Progress {
                    id: r,
                    activity,
                    status,
                    percent,
                } if r == id => {
                    tracing::debug!(host = %self.host, %key, %activity, %status, ?percent, "step progress");
                }
                Response::Cancel { id: r, .. } if self.stray_cancels.contains(&r) => {
                    self.stray_cancels.retain(|c| *c != r);
                }
                Response::Cancel { id: r, found } if cancels.contains(&r) => {
                    cancels.retain(|c| *c != r);
                    tracing::debug!(host = %self.host, %key, found, "cancel answered");
                }
                Response::Fail { id: r, .. } if cancels.contains(&r) => {
                    cancels.retain(|c| *c != r);
                }
                Response::Result {
                    id: r,
                    key: k,
                    status,
                    error,
                    duration_ms,
                    replayed,
                } if r == id => {
                    if k != key {
                        let cause = format!("the result of request {id} names key {k}, not {key}");
                        return self.recover(&key, cause, sent_at).await;
                    }
                    self.stray_cancels.extend(cancels);
                    if let Some(e) = &error {
                        on_output(OutputChunk {
                            seq,
                            stream: Stream::Stderr,
                            data: format!("{}: {}\n", e.category, e.message).into_bytes(),
                        });
                    }
                    self.last_script_error = error;
                    return Ok(ExecResult {
                        idempotency_key: key,
                        status: status.into_exec_status(),
                        duration_ms,
                        stdout_truncated: false,
                        stderr_truncated: false,
                        replayed,
                    });
                }
                Response::Fail {
                    id: r,
                    code,
                    message,
                } if r == id => match code {
                    // Refused before anything ran: the session is fine.
                    FailCode::IdempotencyConflict
                    | FailCode::Busy
                    | FailCode::BadRequest
                    | FailCode::UnsupportedVersion => {
                        self.stray_cancels.extend(cancels);
                        return Err(fail_error(&self.host, code, message, Duration::ZERO));
                    }
                    _ => {
                        let cause = format!("the session host said {}: {message}", code.as_str());
                        return self.recover(&key, cause, sent_at).await;
                    }
                },
                other => {
                    let cause = format!(
                        "the session host sent {} for request {} while {key} was running",
                        other.kind(),
                        other.id()
                    );
                    return self.recover(&key, cause, sent_at).await;
                }
            }
        }
    }

    /// Ends an invocation whose session broke after it was sent: kills the child, starts a
    /// new one, and answers what the key's marker says. Never re-sends.
    async fn recover(
        &mut self,
        key: &str,
        cause: String,
        sent_at: Instant,
    ) -> Result<ExecResult, SessionError> {
        self.break_session(cause.clone()).await;
        let deadline = Instant::now()
            + self.backoff
            + self.settings.connect_timeout
            + self.settings.request_timeout;
        let elapsed = duration_ms(sent_at.elapsed());
        let uncertain = |detail: String| ExecResult {
            idempotency_key: key.to_string(),
            status: ExecStatus::Uncertain { detail },
            duration_ms: elapsed,
            stdout_truncated: false,
            stderr_truncated: false,
            replayed: false,
        };
        match self.query_until(key, deadline).await {
            Ok(IdempotencyStatus::Finished(r)) => Ok(r),
            Ok(IdempotencyStatus::NotFound) if self.settings.mode.is_in_process() => {
                Err(SessionError::Unreachable(format!(
                    "{}: {cause}; key {key} had not started, nothing ran",
                    self.host
                )))
            }
            Ok(IdempotencyStatus::NotFound) => Ok(uncertain(format!(
                "{cause}; the target has no marker for {key}, but the broken remote session may still start it"
            ))),
            Ok(IdempotencyStatus::Running | IdempotencyStatus::Uncertain) => Ok(uncertain(
                format!("{cause}; key {key} was left started with no result"),
            )),
            Err(e) => Err(SessionError::Lost(format!(
                "{}: {cause}; asking the target about key {key} failed: {e}",
                self.host
            ))),
        }
    }

    async fn query_until(
        &mut self,
        key: &str,
        deadline: Instant,
    ) -> Result<IdempotencyStatus, SessionError> {
        self.ensure_ready(deadline).await?;
        let timeout = self.settings.request_timeout;
        let deadline = deadline.min(Instant::now() + timeout);
        let id = self.take_id();
        let wire = Request::Query {
            id,
            key: key.to_string(),
        };
        if let Err(b) = self.send(&wire, deadline).await {
            return Err(self.broke_after_send(b, timeout).await);
        }
        match self.recv(deadline).await {
            Ok(Response::Query {
                id: r,
                key: k,
                state,
                result,
            }) if r == id => {
                if k != key {
                    let e = SessionError::Protocol(format!(
                        "the answer to query {id} names key {k}, not {key}"
                    ));
                    self.break_session(e.to_string()).await;
                    return Err(e);
                }
                contract::idempotency_status(key, state, result).map_err(SessionError::Protocol)
            }
            Ok(Response::Fail {
                id: r,
                code,
                message,
            }) if r == id => Err(self.failed(code, message, timeout).await),
            Ok(other) => Err(self.unexpected(&other, "query").await),
            Err(b) => Err(self.broke_after_send(b, timeout).await),
        }
    }

    fn report(
        &self,
        mut facts: BTreeMap<String, String>,
        volatile: BTreeMap<String, String>,
        script_output: Option<String>,
        wants_script: bool,
    ) -> Result<ProbeReport, SessionError> {
        for required in ["host.name", "os.family", "pwsh.version"] {
            if facts.get(required).is_none_or(|v| v.is_empty()) {
                return Err(SessionError::ProbeMalformed(format!(
                    "the session host reported no {required}"
                )));
            }
        }
        facts.retain(|k, _| !k.starts_with("probe.") && !k.starts_with("transport."));
        let kind = if self.settings.mode.is_in_process() {
            "local"
        } else {
            "psremoting"
        };
        facts.insert("transport.kind".into(), kind.into());
        facts.insert("transport.mode".into(), self.settings.mode.as_str().into());
        if wants_script {
            let out = script_output.ok_or_else(|| {
                SessionError::ProbeMalformed("the probe script printed nothing".into())
            })?;
            facts.extend(contract::script_facts(&out).map_err(SessionError::ProbeMalformed)?);
        }
        let fingerprint = fingerprint(&facts);
        Ok(ProbeReport {
            facts,
            volatile,
            fingerprint,
        })
    }
}

fn fail_error(host: &str, code: FailCode, message: String, timeout: Duration) -> SessionError {
    match code {
        FailCode::AuthFailed => SessionError::AuthFailed(format!("{host}: {message}")),
        FailCode::Unreachable => SessionError::Unreachable(format!("{host}: {message}")),
        FailCode::CredentialUnavailable => {
            SessionError::CredentialUnavailable(format!("{host}: {message}"))
        }
        FailCode::SessionLost => SessionError::Lost(format!("{host}: {message}")),
        FailCode::IdempotencyConflict => SessionError::IdempotencyConflict(message),
        FailCode::ProbeFailed => SessionError::ProbeFailed(message),
        FailCode::TimedOut => SessionError::Timeout(timeout),
        FailCode::BadRequest
        | FailCode::UnsupportedVersion
        | FailCode::Busy
        | FailCode::Internal
        | FailCode::Other => SessionError::Refused {
            code: code.as_str().to_string(),
            message,
        },
    }
}

/// SHA-256 over what makes two requests with one key the same request.
fn request_sha(req: &ExecuteRequest) -> String {
    let mut h = Sha256::new();
    let mut part = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_be_bytes());
        h.update(bytes);
    };
    part(req.shell.as_str().as_bytes());
    part(req.script.as_bytes());
    for (k, v) in &req.env {
        part(k.as_bytes());
        part(v.as_bytes());
    }
    part(req.working_dir.as_deref().unwrap_or("").as_bytes());
    hex::encode(h.finalize())
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(unix)]
fn make_private_dir(d: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().mode(0o700).create(d)
}

#[cfg(not(unix))]
fn make_private_dir(d: &Path) -> std::io::Result<()> {
    std::fs::create_dir(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_script_names_its_contract_version() {
        assert!(SESSION_HOST_SCRIPT.contains(&format!(
            "tollgate-session-host contract v{CONTRACT_VERSION}"
        )));
        assert!(SESSION_HOST_SCRIPT.contains("$ContractVersion = 1"));
    }

    #[test]
    fn a_session_can_move_into_an_actor_future() {
        fn send<T: Send + 'static>() {}
        send::<PwshSession>();
        send::<Canceller>();
    }

    #[test]
    fn request_sha_separates_requests() {
        let base = ExecuteRequest {
            idempotency_key: "k".into(),
            shell: Shell::Pwsh,
            script: "a".into(),
            env: BTreeMap::new(),
            working_dir: None,
            timeout_ms: 1,
        };
        let mut other = base.clone();
        other.script = "b".into();
        assert_ne!(request_sha(&base), request_sha(&other));
        let mut same = base.clone();
        same.timeout_ms = 99;
        same.idempotency_key = "other".into();
        assert_eq!(request_sha(&base), request_sha(&same));
    }

    #[test]
    fn transience_follows_the_brief() {
        assert!(SessionError::Unreachable("x".into()).is_transient());
        assert!(SessionError::Lost("x".into()).is_transient());
        assert!(SessionError::Timeout(Duration::from_secs(1)).is_transient());
        assert!(!SessionError::AuthFailed("x".into()).is_transient());
        assert!(!SessionError::Protocol("x".into()).is_transient());
        assert_eq!(
            SessionError::AuthFailed("x".into()).reason(),
            ReasonCode::AuthFailed
        );
    }
}
