//! One line each way with the child, and what a failure there means: [`Broken`] says how the
//! child broke, and the helpers turn that (or an unexpected or `fail` answer) into a
//! [`SessionError`], killing the child where it can no longer be trusted.

use std::time::Duration;

use tokio::time::Instant;

use super::child::Event;
use super::contract::{self, FailCode, Request, Response};
use super::error::fail_error;
use super::{PwshSession, SessionError};

/// Why a child counts as broken.
#[derive(Debug)]
pub(super) enum Broken {
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
    pub(super) fn after_send(&self) -> SessionError {
        match self {
            Broken::Exited(_) => SessionError::Lost(self.to_string()),
            Broken::Garbage(g) => SessionError::Protocol(g.clone()),
            Broken::Hung(d) => SessionError::Timeout(*d),
        }
    }
}

impl PwshSession {
    pub(super) async fn send(&mut self, req: &Request, deadline: Instant) -> Result<(), Broken> {
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
    pub(super) async fn recv(&mut self, deadline: Instant) -> Result<Response, Broken> {
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

    pub(super) async fn broke_after_send(&mut self, b: Broken, timeout: Duration) -> SessionError {
        let e = match b {
            Broken::Hung(_) => SessionError::Timeout(timeout),
            other => other.after_send(),
        };
        self.break_session(e.to_string()).await;
        e
    }

    pub(super) async fn unexpected(&mut self, r: &Response, waiting_for: &str) -> SessionError {
        let e = SessionError::Protocol(format!(
            "got {} for request {} while waiting for the answer to {waiting_for}",
            r.kind(),
            r.id()
        ));
        self.break_session(e.to_string()).await;
        e
    }

    /// A `fail` answer: the session is broken if the session host said so.
    pub(super) async fn failed(
        &mut self,
        code: FailCode,
        message: String,
        timeout: Duration,
    ) -> SessionError {
        let e = fail_error(&self.host, code, message, timeout);
        if code == FailCode::SessionLost {
            self.break_session(e.to_string()).await;
        }
        e
    }
}
