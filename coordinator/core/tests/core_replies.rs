//! The replies the runtime only carries: their outcome, reason and rule are decided in the core.

use tollgate_core::rules;
use tollgate_core::run::replies::{journal_failed, reply_for, shadow_answer};
use tollgate_core::run::{CheckAnswer, CheckRequest, Dispatch, Effect, Input, StepResult};
use tollgate_protocol::outcome::{Outcome, ReasonCode};
use tollgate_protocol::{Shell, StepErrors};
use uuid::Uuid;

fn check() -> CheckRequest {
    CheckRequest {
        host: "web1".into(),
        phase: 0,
        step_id: "s1".into(),
        shell: Shell::Sh,
        script: "true".into(),
        timeout_ms: 1000,
        errors: StepErrors::Stop,
    }
}

fn dispatch() -> Dispatch {
    Dispatch {
        host: "web1".into(),
        phase: 1,
        phase_name: "stop".into(),
        step_id: "s2".into(),
        shell: Shell::Sh,
        script: "rm -rf /srv/app".into(),
        timeout_ms: 1000,
        idempotency_key: "k".into(),
        attempt: 1,
        destructive: true,
        errors: StepErrors::Stop,
    }
}

#[test]
fn a_journal_failure_is_an_uncertain_outcome_naming_the_error() {
    let r = journal_failed("disk full");
    assert_eq!(
        r.outcome,
        Outcome::PreflightFailed {
            reason: ReasonCode::OutcomeUncertain
        }
    );
    assert_eq!(r.reason, ReasonCode::OutcomeUncertain);
    assert!(r.detail.contains("disk full"), "{}", r.detail);
}

#[test]
fn a_refused_token_blocks_under_its_own_rule_and_an_awaited_plan_names_r006() {
    let run = Uuid::from_u128(7);
    let rejected = Effect::TokenRejected {
        reason: ReasonCode::TokenExpired,
        rule: rules::R008_TOKEN_MUST_VERIFY,
        detail: "expired".into(),
    };
    let r = reply_for(run, &rejected).expect("a refused token is answered");
    assert_eq!(r.rule, Some(rules::R008_TOKEN_MUST_VERIFY));
    assert_eq!(r.reason, ReasonCode::TokenExpired);
    assert!(matches!(
        r.outcome,
        Outcome::PolicyBlocked {
            reason: ReasonCode::TokenExpired,
            ..
        }
    ));

    for effect in [
        Effect::Check(check()),
        Effect::Dispatch(dispatch()),
        Effect::WakeAt { at_ms: 1 },
    ] {
        assert_eq!(reply_for(run, &effect), None, "{effect:?} owes no reply");
    }
}

#[test]
fn a_shadow_host_answers_checks_not_done_and_steps_succeeded_and_nothing_else() {
    assert_eq!(
        shadow_answer(&Effect::Check(check())),
        Some(Input::CheckAnswered {
            host: "web1".into(),
            step_id: "s1".into(),
            answer: CheckAnswer::NotInDesiredState,
        })
    );
    assert_eq!(
        shadow_answer(&Effect::Dispatch(dispatch())),
        Some(Input::StepAnswered {
            host: "web1".into(),
            step_id: "s2".into(),
            idempotency_key: "k".into(),
            result: StepResult::Succeeded,
        })
    );
    assert_eq!(shadow_answer(&Effect::WakeAt { at_ms: 1 }), None);
    assert_eq!(
        shadow_answer(&Effect::ConsumeToken { nonce: "n".into() }),
        None
    );
}
