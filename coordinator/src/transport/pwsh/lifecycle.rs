//! Starting and breaking the child: the lazy start after the back-off, the `hello`
//! handshake, the check of an idle child before each use, and marking the session broken.

use tokio::time::Instant;

use super::child::{ChildProc, Event, Launch};
use super::contract::{CONTRACT_VERSION, Request, Response};
use super::error::fail_error;
use super::settings::resolve_program;
use super::wire::Broken;
use super::{PwshSession, RefusalCode, SessionError};

/// The environment variable through which the child receives the credential reference.
pub const CREDENTIAL_REF_ENV: &str = "TOLLGATE_CREDENTIAL_REF";

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

impl PwshSession {
    /// Makes sure a child with an open session is there, starting one (after the back-off)
    /// if not. A child that died or wrote anything while idle is replaced first.
    pub(super) async fn ensure_ready(&mut self, deadline: Instant) -> Result<(), SessionError> {
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
        self.spawn_child()?;
        self.say_hello(deadline).await
    }

    /// Starts `pwsh` on the session-host script; its environment gets only the credential's
    /// reference.
    fn spawn_child(&mut self) -> Result<(), SessionError> {
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
        Ok(())
    }

    /// Says `hello` to the new child and waits for its answer, within the connect timeout.
    async fn say_hello(&mut self, deadline: Instant) -> Result<HelloInfo, SessionError> {
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
                    return Err(SessionError::Refused {
                        code: RefusalCode::UnsupportedVersion,
                        message: format!(
                            "the session host speaks contract v{v}, this coordinator v{CONTRACT_VERSION}"
                        ),
                    });
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

    pub(super) fn mark_broken(&mut self, reason: String) {
        tracing::warn!(host = %self.host, %reason, "pwsh session broken");
        self.health = SessionHealth::Broken { reason };
        self.hello = None;
        self.stray_cancels.clear();
        self.next_attempt = Some(Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(self.settings.backoff.max);
    }

    /// Kills the child (and its tree) and marks the session broken.
    pub(super) async fn break_session(&mut self, reason: String) {
        if let Some(mut c) = self.child.take() {
            c.kill().await;
        }
        self.mark_broken(reason);
    }
}
