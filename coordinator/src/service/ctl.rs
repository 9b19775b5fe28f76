//! The control port (`tollgate-ctl/1`): one request per stream, authorized by the caller's
//! certificate identity against the authorization table, answered by the coordinator actor.

use std::path::PathBuf;
use std::sync::Arc;

use actix::prelude::*;
use tokio::sync::mpsc;
use tollgate_protocol::agent::HelloAck;
use tollgate_protocol::ctl::{CtlError, CtlErrorCode, CtlRequest, CtlResponse, DiffReport};
use tollgate_protocol::io::{read_frame, write_frame};
use tollgate_protocol::{FrameError, FrameLimits, SUPPORTED, negotiate};
use uuid::Uuid;

use crate::config::Authorization;
use crate::core::authz;
use crate::journal::chain::parse_line;
use crate::journal::{self, Journal};
use crate::runtime::coordinator::{
    Approve, ApproveResult, CancelRun, Coordinator, ExecuteRun, PlanShow, RunsList, Status, Submit,
};
use crate::runtime::recorder::{Head, Indexed, Recorder};
use crate::runtime::run::RunUpdate;

#[derive(Debug)]
pub struct CtlContext {
    pub coordinator: Addr<Coordinator>,
    pub recorder: Addr<Recorder>,
    pub authorization: Authorization,
    pub runs_dir: PathBuf,
    pub public_key: Vec<u8>,
    /// The CRL in force: every accepted operator connection is watched by it.
    pub trust: tollgate_certs::TrustStore,
}

const LIMITS: FrameLimits = FrameLimits::DEFAULT;

fn err(code: CtlErrorCode, message: impl Into<String>) -> CtlResponse {
    CtlResponse::Error(CtlError {
        code,
        message: message.into(),
    })
}

/// Accepts connections until the endpoint closes.
pub async fn serve(endpoint: quinn::Endpoint, ctx: Arc<CtlContext>) {
    while let Some(incoming) = endpoint.accept().await {
        let ctx = ctx.clone();
        actix::spawn(async move {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(conn) => {
                    // Closed at once if the operator's certificate is revoked while it is open.
                    ctx.trust.watch_client(&conn);
                    connection(conn, ctx).await
                }
                Err(e) => tracing::info!(%remote, error = %e, "control connection refused"),
            }
        });
    }
}

async fn connection(conn: quinn::Connection, ctx: Arc<CtlContext>) {
    let Ok(peer) = tollgate_certs::quic::peer_id(&conn) else {
        return;
    };
    let peer = peer.to_string();
    let Ok((mut send, mut recv)) = conn.accept_bi().await else {
        return;
    };
    let hello = match read_frame::<_, CtlRequest>(&mut recv, &LIMITS).await {
        Ok(Some(CtlRequest::Hello(h))) => match negotiate(SUPPORTED, h.versions) {
            Ok(version) => CtlResponse::HelloAck(HelloAck {
                version,
                software: format!("tollgate {}", env!("CARGO_PKG_VERSION")),
            }),
            Err(e) => err(CtlErrorCode::UnsupportedVersion, e.to_string()),
        },
        Ok(_) => err(
            CtlErrorCode::HelloRequired,
            "the first request must be Hello",
        ),
        Err(e) => err(CtlErrorCode::Malformed, e.to_string()),
    };
    let ok = matches!(hello, CtlResponse::HelloAck(_));
    let _ = write_frame(&mut send, &hello, &LIMITS).await;
    let _ = send.finish();
    if !ok {
        let _ = send.stopped().await;
        conn.close(0x10u32.into(), b"hello failed");
        return;
    }
    while let Ok((send, recv)) = conn.accept_bi().await {
        let ctx = ctx.clone();
        let peer = peer.clone();
        let conn = conn.clone();
        actix::spawn(async move { stream(ctx, conn, peer, send, recv).await });
    }
}

async fn stream(
    ctx: Arc<CtlContext>,
    conn: quinn::Connection,
    peer: String,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let req = match read_frame::<_, CtlRequest>(&mut recv, &LIMITS).await {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err(e) => {
            let code = match e {
                FrameError::UnsupportedVersion { .. } => CtlErrorCode::UnsupportedVersion,
                _ => CtlErrorCode::Malformed,
            };
            let _ = write_frame(&mut send, &err(code, e.to_string()), &LIMITS).await;
            let _ = send.finish();
            conn.close(0x10u32.into(), b"protocol violation");
            return;
        }
    };
    if let Err(denied) = authz::authorize(&ctx.authorization, &peer, &req) {
        tracing::warn!(%peer, %denied, "request refused");
        let _ = write_frame(
            &mut send,
            &err(CtlErrorCode::NotAuthorized, denied.to_string()),
            &LIMITS,
        )
        .await;
        let _ = send.finish();
        return;
    }
    match req {
        CtlRequest::Submit(intent) => {
            let (tx, rx) = mpsc::unbounded_channel();
            let accepted = ctx
                .coordinator
                .send(Submit {
                    intent,
                    requestor: peer,
                    watcher: tx,
                })
                .await;
            follow(accepted, rx, &mut send).await;
        }
        CtlRequest::Cancel { run_id } => {
            let (tx, rx) = mpsc::unbounded_channel();
            let accepted = ctx
                .coordinator
                .send(CancelRun {
                    run_id,
                    by: peer,
                    watcher: tx,
                })
                .await;
            follow(accepted, rx, &mut send).await;
        }
        CtlRequest::Execute { run_id, token } => {
            let (tx, rx) = mpsc::unbounded_channel();
            let accepted = ctx
                .coordinator
                .send(ExecuteRun {
                    run_id,
                    token,
                    watcher: tx,
                })
                .await;
            follow(accepted, rx, &mut send).await;
        }
        other => {
            let answer = answer(&ctx, &peer, other).await;
            let _ = write_frame(&mut send, &answer, &LIMITS).await;
        }
    }
    let _ = send.finish();
}

/// Streams progress until the run answers.
async fn follow(
    accepted: Result<Result<(), CtlError>, MailboxError>,
    mut rx: mpsc::UnboundedReceiver<RunUpdate>,
    send: &mut quinn::SendStream,
) {
    match accepted {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            let _ = write_frame(send, &CtlResponse::Error(e), &LIMITS).await;
            return;
        }
        Err(e) => {
            let _ = write_frame(send, &err(CtlErrorCode::Internal, e.to_string()), &LIMITS).await;
            return;
        }
    }
    let mut client_gone = false;
    while let Some(update) = rx.recv().await {
        let (msg, last) = match update {
            RunUpdate::Progress(p) => (CtlResponse::Progress(p), false),
            RunUpdate::Answer(r) => (CtlResponse::Run(r), true),
        };
        // A client that went away does not stop the run; keep draining until the answer.
        if !client_gone && write_frame(send, &msg, &LIMITS).await.is_err() {
            client_gone = true;
        }
        if last {
            return;
        }
    }
    if !client_gone {
        let _ = write_frame(
            send,
            &err(CtlErrorCode::Internal, "the run ended without an answer"),
            &LIMITS,
        )
        .await;
    }
}

/// A run's timeline as read, and whether those very bytes verify (anchored on the live head if
/// the run is open).
struct Timeline {
    lines: Vec<journal::Line>,
    /// Why it does not verify (`line N: ...`), if it does not.
    problem: Option<String>,
}

async fn read_timeline(ctx: &CtlContext, run_id: Uuid) -> Option<Timeline> {
    let dir = run_dir(ctx, run_id);
    let bytes = std::fs::read(dir.join(Journal::FILE)).ok()?;
    let head = ctx.recorder.send(Head { run_id }).await.ok().flatten();
    let check = journal::verify_run_bytes(&dir, run_id, &bytes, &ctx.public_key, head);
    let problem = (!check.ok).then(|| {
        format!(
            "line {}: {}",
            check.first_bad_line.unwrap_or(0),
            check.problem.unwrap_or_default()
        )
    });
    let lines = bytes
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .filter_map(|l| parse_line(l).ok())
        .collect();
    Some(Timeline { lines, problem })
}

/// The answer for a run whose timeline is not there: missing if the signed index names it
/// (deleted or renamed), unknown otherwise.
async fn no_timeline(ctx: &CtlContext, run_id: Uuid) -> CtlResponse {
    if ctx.recorder.send(Indexed { run_id }).await.unwrap_or(false) {
        err(
            CtlErrorCode::RunMissing,
            format!(
                "run {run_id} is in the signed run index but {} is missing (deleted or renamed)",
                run_dir(ctx, run_id).display()
            ),
        )
    } else {
        err(CtlErrorCode::UnknownRun, format!("no run {run_id}"))
    }
}

fn run_dir(ctx: &CtlContext, run_id: Uuid) -> PathBuf {
    ctx.runs_dir.join(run_id.to_string())
}

async fn answer(ctx: &CtlContext, peer: &str, req: CtlRequest) -> CtlResponse {
    match req {
        CtlRequest::Hello(h) => match negotiate(SUPPORTED, h.versions) {
            Ok(version) => CtlResponse::HelloAck(HelloAck {
                version,
                software: "tollgate".into(),
            }),
            Err(e) => err(CtlErrorCode::UnsupportedVersion, e.to_string()),
        },
        CtlRequest::Approve {
            run_id,
            operation_hash,
        } => {
            match ctx
                .coordinator
                .send(Approve {
                    run_id,
                    operation_hash,
                    approver: peer.to_string(),
                })
                .await
            {
                Ok(Ok(ApproveResult::Issued(a))) => CtlResponse::Approved(a),
                Ok(Ok(ApproveResult::Pending {
                    approvers,
                    required,
                })) => CtlResponse::ApprovalRecorded {
                    run_id,
                    approvers,
                    required,
                },
                Ok(Err(e)) => CtlResponse::Error(e),
                Err(e) => err(CtlErrorCode::Internal, e.to_string()),
            }
        }
        CtlRequest::PlanShow { run_id } => match ctx.coordinator.send(PlanShow { run_id }).await {
            Ok(Ok(p)) => CtlResponse::Plan(p),
            Ok(Err(e)) => CtlResponse::Error(e),
            Err(e) => err(CtlErrorCode::Internal, e.to_string()),
        },
        CtlRequest::Status => match ctx.coordinator.send(Status).await {
            Ok(hosts) => CtlResponse::Status { hosts },
            Err(e) => err(CtlErrorCode::Internal, e.to_string()),
        },
        CtlRequest::RunsList => match ctx.coordinator.send(RunsList).await {
            Ok(runs) => CtlResponse::Runs { runs },
            Err(e) => err(CtlErrorCode::Internal, e.to_string()),
        },
        CtlRequest::RunsShow { run_id } => {
            match std::fs::read_to_string(run_dir(ctx, run_id).join("summary.json")) {
                Ok(json) => CtlResponse::Summary { json },
                Err(_) if !run_dir(ctx, run_id).join(Journal::FILE).exists() => {
                    no_timeline(ctx, run_id).await
                }
                Err(_) => err(
                    CtlErrorCode::UnknownRun,
                    format!("run {run_id} has no summary yet (still open)"),
                ),
            }
        }
        CtlRequest::RunsVerify { run_id } => {
            let dir = run_dir(ctx, run_id);
            if !dir.join(Journal::FILE).exists() {
                return no_timeline(ctx, run_id).await;
            }
            let head = ctx.recorder.send(Head { run_id }).await.ok().flatten();
            let r = journal::verify_run_dir_open(&dir, run_id, &ctx.public_key, head);
            CtlResponse::Verified(r.to_wire(run_id))
        }
        CtlRequest::Explain { run_id } => {
            let Some(t) = read_timeline(ctx, run_id).await else {
                return no_timeline(ctx, run_id).await;
            };
            let mut lines: Vec<String> = Vec::new();
            if let Some(problem) = &t.problem {
                lines.push(format!(
                    "WARNING: this timeline does not verify ({problem}); the account below may not be true."
                ));
            }
            lines.extend(crate::explain::sentences(&t.lines));
            CtlResponse::Explanation { lines }
        }
        CtlRequest::RunsDiff { a, b } => {
            let Some(ta) = read_timeline(ctx, a).await else {
                return no_timeline(ctx, a).await;
            };
            let Some(tb) = read_timeline(ctx, b).await else {
                return no_timeline(ctx, b).await;
            };
            let problem = match (&ta.problem, &tb.problem) {
                (Some(p), _) => Some(format!("run {a} does not verify ({p})")),
                (None, Some(p)) => Some(format!("run {b} does not verify ({p})")),
                (None, None) => None,
            };
            // An unverifiable record is not compared: its decisions may not be true.
            let differences = if problem.is_some() {
                Vec::new()
            } else {
                crate::diff::compare(&ta.lines, &tb.lines)
            };
            CtlResponse::Diff(DiffReport {
                a,
                b,
                parity: problem.is_none() && differences.is_empty(),
                decisions_a: crate::diff::count(&ta.lines),
                decisions_b: crate::diff::count(&tb.lines),
                differences,
                problem,
            })
        }
        CtlRequest::Submit(_) | CtlRequest::Execute { .. } | CtlRequest::Cancel { .. } => {
            err(CtlErrorCode::InvalidRequest, "streamed request")
        }
    }
}
