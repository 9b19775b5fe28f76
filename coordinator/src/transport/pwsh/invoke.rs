//! Running one step: the `invoke` request, its output as it comes, cancels sent on the way,
//! and, when the session breaks after sending, the answer from the key's marker.

use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::time::Instant;
use tollgate_protocol::agent::{
    ExecResult, ExecStatus, ExecuteRequest, IdempotencyStatus, OutputChunk, Stream,
};

use super::child::Event;
use super::contract::{FailCode, Request, Response, TextStream};
use super::error::fail_error;
use super::session::duration_ms;
use super::wire::Broken;
use super::{PwshSession, SessionError};

enum Step {
    Event(Event),
    Cancel(String),
    Hung,
}

impl PwshSession {
    pub(super) async fn invoke(
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use tollgate_protocol::Shell;

    use super::*;

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
}
