//! Running one step: the `invoke` request, its output as it comes, cancels sent on the way,
//! and, when the session breaks after sending, the answer from the key's marker.

use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::time::Instant;
use tollgate_protocol::agent::{
    ExecResult, ExecStatus, ExecuteRequest, IdempotencyStatus, OutputChunk, Stream,
};

use super::child::Event;
use super::contract::{FailCode, Request, Response, TextStream, WireStatus};
use super::error::fail_error;
use super::session::duration_ms;
use super::wire::Broken;
use super::{PwshSession, SessionError};

/// What the invocation waits for next.
enum Step {
    Event(Event),
    Cancel(String),
    Hung,
    /// There is no child to wait for.
    Gone,
}

/// What one step of the wait means for the invocation.
enum Next {
    /// Keep waiting.
    Wait,
    /// The invocation ended with this answer.
    Done(Result<ExecResult, SessionError>),
    /// The session broke after the request was sent, for this cause: recover from the marker.
    Broke(String),
}

/// One invocation in flight.
struct Flight {
    id: u64,
    key: String,
    /// The request's timeout plus the answer margin: past it the child counts as hung.
    limit: Duration,
    deadline: Instant,
    sent_at: Instant,
    /// The next output chunk's number.
    seq: u64,
    /// The `cancel` requests sent for this invocation, not yet answered.
    cancels: Vec<u64>,
}

impl Flight {
    /// Hands one chunk of output on, numbered in order.
    fn emit(&mut self, on_output: &mut impl FnMut(OutputChunk), stream: Stream, data: Vec<u8>) {
        on_output(OutputChunk {
            seq: self.seq,
            stream,
            data,
        });
        self.seq += 1;
    }

    /// The invocation's answer from its `result` line.
    fn result(&self, status: WireStatus, duration_ms: u64, replayed: bool) -> ExecResult {
        ExecResult {
            idempotency_key: self.key.clone(),
            status: status.into_exec_status(),
            duration_ms,
            stdout_truncated: false,
            stderr_truncated: false,
            replayed,
        }
    }
}

impl PwshSession {
    /// Sends the step and waits for its answer, handing output on as it comes and forwarding
    /// cancels; a break after sending ends in [`Self::recover`], never in a re-send.
    pub(super) async fn invoke(
        &mut self,
        req: ExecuteRequest,
        on_output: &mut impl FnMut(OutputChunk),
    ) -> Result<ExecResult, SessionError> {
        let key = req.idempotency_key.clone();
        let limit = Duration::from_millis(req.timeout_ms) + self.settings.answer_margin;
        let deadline = Instant::now() + limit;
        let id = self.take_id();
        let wire = invoke_request(id, req);
        let mut f = Flight {
            id,
            key,
            limit,
            deadline,
            sent_at: Instant::now(),
            seq: 0,
            cancels: Vec::new(),
        };
        if let Err(b) = self.send(&wire, deadline).await {
            return self.recover(&f.key, b.to_string(), f.sent_at).await;
        }
        loop {
            let next = match self.next_step(deadline).await {
                Step::Gone => Next::Broke("the session host is gone".into()),
                Step::Cancel(k) => self.forward_cancel(&mut f, &k).await,
                Step::Hung => Next::Broke(Broken::Hung(f.limit).to_string()),
                Step::Event(Event::Garbage(g)) => Next::Broke(Broken::Garbage(g).to_string()),
                Step::Event(Event::Eof) => {
                    Next::Broke(Broken::Exited(self.how_it_exited().await).to_string())
                }
                Step::Event(Event::Message(r)) => self.on_response(&mut f, r, on_output),
            };
            match next {
                Next::Wait => {}
                Next::Done(answer) => return answer,
                Next::Broke(cause) => return self.recover(&f.key, cause, f.sent_at).await,
            }
        }
    }

    /// Waits for the child's next event, a cancel from a [`super::Canceller`], or the deadline.
    async fn next_step(&mut self, deadline: Instant) -> Step {
        let Some(child) = self.child.as_mut() else {
            return Step::Gone;
        };
        let cancel_rx = &mut self.cancel_rx;
        tokio::select! {
            ev = child.next_event() => Step::Event(ev),
            Some(k) = cancel_rx.recv() => Step::Cancel(k),
            _ = tokio::time::sleep_until(deadline) => Step::Hung,
        }
    }

    /// Sends `cancel` for the invocation if `key` is its key; other keys do not run here.
    async fn forward_cancel(&mut self, f: &mut Flight, key: &str) -> Next {
        if key != f.key {
            return Next::Wait;
        }
        let cid = self.take_id();
        f.cancels.push(cid);
        let line = Request::Cancel {
            id: cid,
            key: f.key.clone(),
        };
        match self.send(&line, f.deadline).await {
            Ok(()) => Next::Wait,
            Err(b) => Next::Broke(b.to_string()),
        }
    }

    /// How the child that sent end-of-file exited.
    async fn how_it_exited(&mut self) -> String {
        match self.child.as_mut() {
            Some(c) => c.describe_exit().await,
            None => "is gone".to_string(),
        }
    }

    /// One message from the child while the invocation runs.
    fn on_response(
        &mut self,
        f: &mut Flight,
        resp: Response,
        on_output: &mut impl FnMut(OutputChunk),
    ) -> Next {
        if self.note_cancel_answer(f, &resp) {
            return Next::Wait;
        }
        match resp {
            Response::Output { id, stream, data } if id == f.id => {
                let stream = match stream {
                    TextStream::Stdout => Stream::Stdout,
                    TextStream::Stderr => Stream::Stderr,
                };
                f.emit(on_output, stream, data.into_bytes());
                Next::Wait
            }
            Response::Error { id, data, .. } if id == f.id => {
                f.emit(on_output, Stream::Stderr, data.into_bytes());
                Next::Wait
            }
            Response::Progress {
                id,
                activity,
                status,
                percent,
            } if id == f.id => {
                tracing::debug!(host = %self.host, key = %f.key, %activity, %status, ?percent, "step progress");
                Next::Wait
            }
            Response::Result {
                id,
                key,
                status,
                error,
                duration_ms,
                replayed,
            } if id == f.id => {
                if key != f.key {
                    let cause =
                        format!("the result of request {id} names key {key}, not {}", f.key);
                    return Next::Broke(cause);
                }
                self.stray_cancels.append(&mut f.cancels);
                if let Some(e) = &error {
                    let line = format!("{}: {}\n", e.category, e.message);
                    f.emit(on_output, Stream::Stderr, line.into_bytes());
                }
                self.last_script_error = error;
                Next::Done(Ok(f.result(status, duration_ms, replayed)))
            }
            Response::Fail { id, code, message } if id == f.id => self.on_fail(f, code, message),
            other => Next::Broke(format!(
                "the session host sent {} for request {} while {} was running",
                other.kind(),
                other.id(),
                f.key
            )),
        }
    }

    /// Whether `resp` answers a `cancel` (this invocation's, or one sent for an invocation that
    /// has ended); such an answer is noted and otherwise ignored.
    fn note_cancel_answer(&mut self, f: &mut Flight, resp: &Response) -> bool {
        match *resp {
            Response::Cancel { id, .. } if self.stray_cancels.contains(&id) => {
                self.stray_cancels.retain(|c| *c != id);
            }
            Response::Cancel { id, found } if f.cancels.contains(&id) => {
                f.cancels.retain(|c| *c != id);
                tracing::debug!(host = %self.host, key = %f.key, found, "cancel answered");
            }
            Response::Fail { id, .. } if f.cancels.contains(&id) => {
                f.cancels.retain(|c| *c != id);
            }
            _ => return false,
        }
        true
    }

    /// A `fail` for the invocation itself.
    fn on_fail(&mut self, f: &mut Flight, code: FailCode, message: String) -> Next {
        match code {
            // Refused before anything ran: the session is fine.
            FailCode::IdempotencyConflict
            | FailCode::Busy
            | FailCode::BadRequest
            | FailCode::UnsupportedVersion => {
                self.stray_cancels.append(&mut f.cancels);
                Next::Done(Err(fail_error(&self.host, code, message, Duration::ZERO)))
            }
            _ => Next::Broke(format!(
                "the session host said {}: {message}",
                code.as_str()
            )),
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

/// The `invoke` line for `req`.
fn invoke_request(id: u64, req: ExecuteRequest) -> Request {
    let request_sha = request_sha(&req);
    Request::Invoke {
        id,
        key: req.idempotency_key,
        request_sha,
        shell: req.shell,
        script: req.script,
        env: req.env,
        working_dir: req.working_dir,
        timeout_ms: req.timeout_ms,
        errors: req.errors,
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
    part(req.errors.as_str().as_bytes());
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use tollgate_protocol::{Shell, StepErrors};

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
            errors: StepErrors::Stop,
        };
        let mut other = base.clone();
        other.script = "b".into();
        assert_ne!(request_sha(&base), request_sha(&other));
        let mut other = base.clone();
        other.errors = StepErrors::Continue;
        assert_ne!(
            request_sha(&base),
            request_sha(&other),
            "errors is part of it"
        );
        let mut same = base.clone();
        same.timeout_ms = 99;
        same.idempotency_key = "other".into();
        assert_eq!(request_sha(&base), request_sha(&same));
    }
}
