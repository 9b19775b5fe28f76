//! Every message of both links round-trips through the framing, in any chunking.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;

use proptest::prelude::*;
use tollgate_protocol::agent::*;
use tollgate_protocol::ctl::*;
use tollgate_protocol::outcome::*;
use tollgate_protocol::{
    Action, FrameDecoder, FrameLimits, Mode, Shell, StepErrors, VersionRange, decode_body,
    encode_frame,
};
use uuid::Uuid;

fn text() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9 ._/-]{0,16}"
}
fn facts() -> impl Strategy<Value = BTreeMap<String, String>> {
    prop::collection::btree_map(text(), text(), 0..4)
}
fn uuid() -> impl Strategy<Value = Uuid> {
    any::<u128>().prop_map(Uuid::from_u128)
}
fn action() -> impl Strategy<Value = Action> {
    prop_oneof![Just(Action::Deploy), Just(Action::Teardown)]
}
fn mode() -> impl Strategy<Value = Mode> {
    prop_oneof![Just(Mode::Quick), Just(Mode::Full)]
}
fn shell() -> impl Strategy<Value = Shell> {
    prop_oneof![Just(Shell::Pwsh), Just(Shell::Sh)]
}
fn versions() -> impl Strategy<Value = VersionRange> {
    (any::<u16>(), any::<u16>()).prop_map(|(min, max)| VersionRange { min, max })
}
fn hello() -> impl Strategy<Value = Hello> {
    (versions(), text()).prop_map(|(versions, software)| Hello { versions, software })
}
fn reason() -> impl Strategy<Value = ReasonCode> {
    prop::sample::select(vec![
        ReasonCode::TokenMissing,
        ReasonCode::TokenExpired,
        ReasonCode::TokenScopeMismatch,
        ReasonCode::TokenReplayed,
        ReasonCode::TokenSignatureInvalid,
        ReasonCode::ApproverNotAuthorized,
        ReasonCode::StalePlan,
        ReasonCode::ContainmentFailed,
        ReasonCode::AuthFailed,
        ReasonCode::Unreachable,
        ReasonCode::NonZeroExit,
        ReasonCode::OutcomeUncertain,
        ReasonCode::AllStepsSucceeded,
    ])
}
fn errors() -> impl Strategy<Value = StepErrors> {
    prop_oneof![Just(StepErrors::Stop), Just(StepErrors::Continue)]
}
fn plan() -> impl Strategy<Value = PlanView> {
    let step = (
        text(),
        text(),
        prop::collection::vec(text(), 0..3),
        any::<bool>(),
        any::<bool>(),
        errors(),
    )
        .prop_map(
            |(phase, step_id, hosts, destructive, barrier_before, errors)| PlanStepView {
                phase,
                step_id,
                hosts,
                destructive,
                barrier_before,
                errors,
            },
        );
    (
        text(),
        prop::collection::vec(text(), 0..4),
        prop::collection::vec(step, 0..4),
        1u8..3,
        any::<bool>(),
    )
        .prop_map(
            |(operation_hash, hosts, steps, approvals_required, self_approval)| PlanView {
                operation_hash,
                hosts,
                steps,
                approvals_required,
                self_approval,
            },
        )
}
fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        Just(Outcome::Completed),
        (
            prop::collection::vec(text(), 0..3),
            prop::collection::vec(text(), 0..3)
        )
            .prop_map(|(succeeded, failed)| Outcome::PartialSuccess { succeeded, failed }),
        (reason(), text()).prop_map(|(reason, rule)| Outcome::PolicyBlocked { reason, rule }),
        (text(), text())
            .prop_map(|(rule, next_command)| Outcome::EscalationRequired { rule, next_command }),
        (uuid(), text(), plan()).prop_map(|(run_id, operation_hash, plan)| {
            Outcome::ConfirmationRequired {
                run_id,
                operation_hash,
                plan,
            }
        }),
        reason().prop_map(|reason| Outcome::PreflightFailed { reason }),
        reason().prop_map(|reason| Outcome::TransportUnreachable { reason }),
        text().prop_map(|capability| Outcome::CapabilityMismatch { capability }),
        (text(), reason(), any::<Option<i32>>()).prop_map(|(step_id, reason, exit_code)| {
            Outcome::ExecutionFailed {
                step_id,
                reason,
                exit_code,
            }
        }),
    ]
}
fn run_report() -> impl Strategy<Value = RunReport> {
    let host = (text(), text(), outcome(), reason(), text(), facts()).prop_map(
        |(host, lifecycle, outcome, reason, detail, facts)| HostReport {
            host,
            lifecycle,
            outcome,
            reason,
            detail,
            facts,
        },
    );
    (
        uuid(),
        action(),
        mode(),
        mode(),
        outcome(),
        reason(),
        any::<Option<String>>(),
        text(),
        prop::collection::vec(host, 0..3),
        text(),
    )
        .prop_map(
            |(
                run_id,
                action,
                requested_mode,
                effective_mode,
                outcome,
                reason,
                rule,
                detail,
                hosts,
                artifacts,
            )| RunReport {
                run_id,
                action,
                requested_mode,
                effective_mode,
                outcome,
                reason,
                rule,
                detail,
                hosts,
                artifacts,
            },
        )
}
fn exec_status() -> impl Strategy<Value = ExecStatus> {
    prop_oneof![
        any::<i32>().prop_map(|code| ExecStatus::Exited { code }),
        any::<i32>().prop_map(|signal| ExecStatus::Killed { signal }),
        Just(ExecStatus::TimedOut),
        Just(ExecStatus::Cancelled),
        (shell(), text())
            .prop_map(|(shell, detail)| ExecStatus::CapabilityMismatch { shell, detail }),
        text().prop_map(|detail| ExecStatus::SpawnFailed { detail }),
        text().prop_map(|detail| ExecStatus::Uncertain { detail }),
    ]
}
fn exec_result() -> impl Strategy<Value = ExecResult> {
    (
        text(),
        exec_status(),
        any::<u64>(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(
                idempotency_key,
                status,
                duration_ms,
                stdout_truncated,
                stderr_truncated,
                replayed,
            )| ExecResult {
                idempotency_key,
                status,
                duration_ms,
                stdout_truncated,
                stderr_truncated,
                replayed,
            },
        )
}

fn agent_request() -> impl Strategy<Value = AgentRequest> {
    prop_oneof![
        hello().prop_map(AgentRequest::Hello),
        (prop::option::of((shell(), text())), any::<u64>()).prop_map(|(s, timeout_ms)| {
            AgentRequest::Probe(ProbeRequest {
                script: s.map(|(shell, body)| Script { shell, body }),
                timeout_ms,
            })
        }),
        (
            text(),
            shell(),
            text(),
            facts(),
            prop::option::of(text()),
            any::<u64>(),
            errors()
        )
            .prop_map(
                |(idempotency_key, shell, script, env, working_dir, timeout_ms, errors)| {
                    AgentRequest::Execute(ExecuteRequest {
                        idempotency_key,
                        shell,
                        script,
                        env,
                        working_dir,
                        timeout_ms,
                        errors,
                    })
                }
            ),
        text().prop_map(|idempotency_key| AgentRequest::Cancel { idempotency_key }),
        text().prop_map(|idempotency_key| AgentRequest::QueryIdempotency { idempotency_key }),
    ]
}

fn agent_response() -> impl Strategy<Value = AgentResponse> {
    prop_oneof![
        (any::<u16>(), text()).prop_map(|(version, software)| AgentResponse::HelloAck(HelloAck {
            version,
            software
        })),
        (facts(), facts(), text()).prop_map(|(facts, volatile, fingerprint)| {
            AgentResponse::ProbeReport(ProbeReport {
                facts,
                volatile,
                fingerprint,
            })
        }),
        (
            any::<u64>(),
            any::<bool>(),
            prop::collection::vec(any::<u8>(), 0..64)
        )
            .prop_map(|(seq, out, data)| {
                AgentResponse::Output(OutputChunk {
                    seq,
                    stream: if out { Stream::Stdout } else { Stream::Stderr },
                    data,
                })
            }),
        exec_result().prop_map(AgentResponse::ExecResult),
        any::<bool>().prop_map(|found| AgentResponse::CancelAck { found }),
        prop_oneof![
            Just(IdempotencyStatus::NotFound),
            Just(IdempotencyStatus::Running),
            Just(IdempotencyStatus::Uncertain),
            exec_result().prop_map(IdempotencyStatus::Finished),
        ]
        .prop_map(AgentResponse::Idempotency),
        text().prop_map(|message| AgentResponse::Error(AgentError {
            code: AgentErrorCode::Busy,
            message
        })),
    ]
}

fn ctl_request() -> impl Strategy<Value = CtlRequest> {
    prop_oneof![
        hello().prop_map(CtlRequest::Hello),
        (
            action(),
            mode(),
            prop::collection::vec(text(), 0..4),
            uuid(),
            text(),
            any::<bool>()
        )
            .prop_map(
                |(action, requested_mode, target_hosts, run_id, requestor, shadow)| {
                    CtlRequest::Submit(OperationIntent {
                        action,
                        requested_mode,
                        target_hosts,
                        run_id,
                        requestor,
                        shadow,
                    })
                }
            ),
        uuid().prop_map(|run_id| CtlRequest::PlanShow { run_id }),
        (uuid(), text()).prop_map(|(run_id, operation_hash)| CtlRequest::Approve {
            run_id,
            operation_hash
        }),
        (uuid(), text()).prop_map(|(run_id, token)| CtlRequest::Execute { run_id, token }),
        Just(CtlRequest::Status),
        Just(CtlRequest::RunsList),
        uuid().prop_map(|run_id| CtlRequest::RunsShow { run_id }),
        uuid().prop_map(|run_id| CtlRequest::RunsVerify { run_id }),
        uuid().prop_map(|run_id| CtlRequest::Explain { run_id }),
        (uuid(), uuid()).prop_map(|(a, b)| CtlRequest::RunsDiff { a, b }),
    ]
}

fn ctl_response() -> impl Strategy<Value = CtlResponse> {
    let progress = (
        uuid(),
        prop::option::of(text()),
        any::<u32>(),
        any::<u32>(),
        text(),
    )
        .prop_map(|(run_id, host, done, total, message)| ProgressEvent {
            run_id,
            kind: ProgressKind::StepFinished,
            host,
            phase: None,
            step: Some("s".into()),
            ok: Some(true),
            done,
            total,
            message,
        });
    let status = (
        text(),
        text(),
        prop::option::of(text()),
        prop::option::of(any::<u64>()),
    )
        .prop_map(|(host, lifecycle, fingerprint, last_probe_ms)| HostStatus {
            host,
            role: "web".into(),
            safety_class: "standard".into(),
            transport: "agent".into(),
            lifecycle,
            fingerprint,
            last_probe_ms,
            detail: String::new(),
        });
    prop_oneof![
        (any::<u16>(), text())
            .prop_map(|(version, software)| CtlResponse::HelloAck(HelloAck { version, software })),
        progress.prop_map(CtlResponse::Progress),
        run_report().prop_map(CtlResponse::Run),
        plan().prop_map(CtlResponse::Plan),
        (uuid(), text(), text(), any::<u64>(), text()).prop_map(
            |(run_id, operation_hash, token, expires_ms, next_command)| {
                CtlResponse::Approved(Approval {
                    run_id,
                    operation_hash,
                    token,
                    expires_ms,
                    next_command,
                })
            }
        ),
        prop::collection::vec(status, 0..3).prop_map(|hosts| CtlResponse::Status { hosts }),
        (uuid(), action(), mode(), text(), text(), any::<u64>()).prop_map(
            |(run_id, action, effective_mode, requestor, state, started_ms)| CtlResponse::Runs {
                runs: vec![RunListEntry {
                    run_id,
                    action,
                    effective_mode,
                    requestor,
                    state,
                    started_ms
                }]
            }
        ),
        text().prop_map(|json| CtlResponse::Summary { json }),
        (
            uuid(),
            uuid(),
            any::<bool>(),
            text(),
            prop::option::of(text()),
            prop::option::of(text())
        )
            .prop_map(|(a, b, parity, scope, da, problem)| {
                CtlResponse::Diff(DiffReport {
                    a,
                    b,
                    parity,
                    decisions_a: 3,
                    decisions_b: 4,
                    differences: vec![DecisionDifference {
                        scope,
                        index: 2,
                        a: da,
                        b: None,
                    }],
                    problem,
                })
            }),
        (
            uuid(),
            any::<bool>(),
            any::<u64>(),
            prop::option::of(any::<u64>()),
            prop::option::of(text())
        )
            .prop_map(|(run_id, ok, events, first_bad_line, problem)| {
                CtlResponse::Verified(VerifyReport {
                    run_id,
                    ok,
                    events,
                    first_bad_line,
                    problem,
                })
            }),
        prop::collection::vec(text(), 0..4).prop_map(|lines| CtlResponse::Explanation { lines }),
        text().prop_map(|message| CtlResponse::Error(CtlError {
            code: CtlErrorCode::UnknownRun,
            message
        })),
    ]
}

/// Encodes, then decodes both in one piece and split at `cut`.
fn round_trip<T>(msg: &T, cut: usize) -> Result<(), TestCaseError>
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let limits = FrameLimits::DEFAULT;
    let frame = encode_frame(msg, &limits).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let body = &frame[4..];
    prop_assert_eq!(
        u32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize,
        body.len()
    );
    let back: T = decode_body(body, &limits).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(&back, msg);
    let cut = cut % (frame.len() + 1);
    let mut dec = FrameDecoder::new(limits);
    dec.push(&frame[..cut])
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let early: Option<T> = dec
        .next_message()
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(early.is_some(), cut == frame.len());
    dec.push(&frame[cut..])
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let got = match early {
        Some(m) => m,
        None => dec
            .next_message()
            .map_err(|e| TestCaseError::fail(e.to_string()))?
            .ok_or_else(|| TestCaseError::fail("no message"))?,
    };
    prop_assert_eq!(&got, msg);
    dec.finish()
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn agent_requests_round_trip(m in agent_request(), cut in any::<usize>()) { round_trip(&m, cut)?; }

    #[test]
    fn agent_responses_round_trip(m in agent_response(), cut in any::<usize>()) { round_trip(&m, cut)?; }

    #[test]
    fn ctl_requests_round_trip(m in ctl_request(), cut in any::<usize>()) { round_trip(&m, cut)?; }

    #[test]
    fn ctl_responses_round_trip(m in ctl_response(), cut in any::<usize>()) { round_trip(&m, cut)?; }
}

#[tokio::test]
async fn async_helpers_round_trip_over_a_duplex_stream() {
    let limits = FrameLimits::DEFAULT;
    let (mut a, mut b) = tokio::io::duplex(64);
    let msgs = vec![
        CtlRequest::Status,
        CtlRequest::RunsList,
        CtlRequest::Explain {
            run_id: Uuid::from_u128(7),
        },
    ];
    let sent = msgs.clone();
    let writer = tokio::spawn(async move {
        for m in &sent {
            tollgate_protocol::io::write_frame(&mut a, m, &limits)
                .await
                .unwrap();
        }
    });
    let mut got = Vec::new();
    for _ in 0..msgs.len() {
        got.push(
            tollgate_protocol::io::read_required::<_, CtlRequest>(&mut b, &limits)
                .await
                .unwrap(),
        );
    }
    writer.await.unwrap();
    // The writer is gone: a clean end of stream on a frame boundary.
    assert!(
        tollgate_protocol::io::read_frame::<_, CtlRequest>(&mut b, &limits)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(got, msgs);
}
