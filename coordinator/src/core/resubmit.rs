//! May an intent reuse an existing run id? Only to continue an escalation: the escalation
//! command (`tollgate ACTION --mode full --hosts ... --run RUN_ID`) re-submits the escalated run
//! in full mode. Any other reuse is refused, so a run id always names one story.

use tollgate_protocol::outcome::OutcomeKind;
use tollgate_protocol::{Action, Mode};

/// What is known about the existing run with that id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExistingRun {
    pub action: Action,
    /// `None` while the run is still live.
    pub finished_as: Option<OutcomeKind>,
}

/// Why the id cannot be reused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReuseRefused {
    #[error("the run is still in progress")]
    StillRunning,
    #[error("only an escalated run can be continued (this one ended {0})")]
    NotEscalated(OutcomeKind),
    #[error("the escalated run was a {expected}; a {got} cannot continue it")]
    OtherAction { expected: Action, got: Action },
    #[error("an escalated run continues only in full mode")]
    NotFull,
}

/// Allows re-submitting `existing`'s id for `action` in `mode`, or says why not.
pub fn may_reuse_run_id(
    existing: ExistingRun,
    action: Action,
    mode: Mode,
) -> Result<(), ReuseRefused> {
    let finished = existing.finished_as.ok_or(ReuseRefused::StillRunning)?;
    if finished != OutcomeKind::EscalationRequired {
        return Err(ReuseRefused::NotEscalated(finished));
    }
    if existing.action != action {
        return Err(ReuseRefused::OtherAction {
            expected: existing.action,
            got: action,
        });
    }
    if mode != Mode::Full {
        return Err(ReuseRefused::NotFull);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_escalated_run_continues_in_full_mode_with_the_same_action() {
        let escalated = ExistingRun {
            action: Action::Teardown,
            finished_as: Some(OutcomeKind::EscalationRequired),
        };
        assert_eq!(
            may_reuse_run_id(escalated, Action::Teardown, Mode::Full),
            Ok(())
        );
        assert_eq!(
            may_reuse_run_id(escalated, Action::Teardown, Mode::Quick),
            Err(ReuseRefused::NotFull)
        );
        assert!(matches!(
            may_reuse_run_id(escalated, Action::Deploy, Mode::Full),
            Err(ReuseRefused::OtherAction { .. })
        ));
        let live = ExistingRun {
            action: Action::Teardown,
            finished_as: None,
        };
        assert_eq!(
            may_reuse_run_id(live, Action::Teardown, Mode::Full),
            Err(ReuseRefused::StillRunning)
        );
        for kind in [
            OutcomeKind::Completed,
            OutcomeKind::PolicyBlocked,
            OutcomeKind::ConfirmationRequired,
            OutcomeKind::PartialSuccess,
            OutcomeKind::ExecutionFailed,
        ] {
            let done = ExistingRun {
                action: Action::Teardown,
                finished_as: Some(kind),
            };
            assert_eq!(
                may_reuse_run_id(done, Action::Teardown, Mode::Full),
                Err(ReuseRefused::NotEscalated(kind))
            );
        }
    }
}
