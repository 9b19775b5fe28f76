//! [`PwshSession`], one host's supervised `pwsh` child: its state and its public calls. The
//! supervisor's parts sit beside it, each an `impl PwshSession` of its own: `lifecycle`
//! (start, `hello`, back-off, break), `wire` (one line each way), `probe`, `invoke` (a step
//! and its recovery) and `script_file` (the script on disk).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tollgate_protocol::Shell;
use tollgate_protocol::agent::{
    ExecResult, ExecStatus, ExecuteRequest, IdempotencyStatus, OutputChunk,
};

use super::child::ChildProc;
use super::contract::{self, Request, Response, ScriptError};
use super::script_file::ScriptFile;
use super::{Canceller, HelloInfo, PwshSettings, SessionError, SessionHealth};

/// One host's supervised `pwsh` child. Calls are serialized by `&mut self`; to cancel an
/// invocation while it runs, use a [`Canceller`].
#[derive(Debug)]
pub struct PwshSession {
    pub(super) host: String,
    pub(super) settings: PwshSettings,
    pub(super) child: Option<ChildProc>,
    pub(super) hello: Option<HelloInfo>,
    pub(super) health: SessionHealth,
    pub(super) backoff: Duration,
    pub(super) next_attempt: Option<Instant>,
    pub(super) next_id: u64,
    pub(super) spawns: u64,
    pub(super) script: Option<ScriptFile>,
    /// `cancel` requests sent whose answers may still come after their invocation ended.
    pub(super) stray_cancels: Vec<u64>,
    pub(super) inflight: Arc<Mutex<Option<String>>>,
    pub(super) cancel_tx: mpsc::UnboundedSender<String>,
    pub(super) cancel_rx: mpsc::UnboundedReceiver<String>,
    pub(super) last_script_error: Option<ScriptError>,
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
        Canceller::new(self.inflight.clone(), self.cancel_tx.clone())
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
            Err(e @ (SessionError::PwshMissing { .. } | SessionError::PwshTooOld(_))) => {
                return Ok(ExecResult {
                    idempotency_key: req.idempotency_key,
                    status: ExecStatus::CapabilityMismatch {
                        shell: Shell::Pwsh,
                        detail: e.to_string(),
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

    pub(super) fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    pub(super) fn set_inflight(&self, key: Option<String>) {
        if let Ok(mut k) = self.inflight.lock() {
            *k = key;
        }
    }

    pub(super) async fn query_until(
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
}

pub(super) fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_can_move_into_an_actor_future() {
        fn send<T: Send + 'static>() {}
        send::<PwshSession>();
        send::<Canceller>();
    }
}
