//! Collecting approvals for a plan that needs one or two distinct approvers.
//!
//! The first approval is recorded; a second *distinct* approver completes a two-approver
//! request; the same approver twice does not count. Every approver must hold the `approver`
//! role and name the plan's exact operation hash.

use uuid::Uuid;

use crate::config::{Authorization, Role};

/// What is being approved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalRequest {
    /// The run.
    pub run_id: Uuid,
    /// The plan's operation hash.
    pub operation_hash: String,
    /// Distinct approvers needed (1 or 2).
    pub required: u8,
    /// Everyone who submitted the run (its first submission and any continuation).
    pub requesters: Vec<String>,
    /// Whether the requester may be one of the approvers (the plan's `self_approval`).
    pub self_approval: bool,
}

/// Approvals collected so far (fewer than required).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingApproval {
    request: ApprovalRequest,
    approvers: Vec<String>,
}

/// Enough distinct approvers: a token may be issued for them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompleteApproval {
    /// What was approved.
    pub request: ApprovalRequest,
    /// The distinct approvers, sorted (as a token carries them).
    pub approvers: Vec<String>,
}

/// The result of one approval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApprovalProgress {
    /// More approvers are needed. `counted` is false when the approver had already approved.
    Pending {
        /// The updated collection.
        pending: PendingApproval,
        /// Whether this approval added an approver.
        counted: bool,
    },
    /// Done.
    Complete(CompleteApproval),
}

/// Why an approval was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApprovalError {
    /// The identity does not hold the `approver` role.
    #[error("{0} does not hold the approver role")]
    NotAnApprover(String),
    /// The requester may not approve this run (separation of duties, rule `R011`).
    #[error(
        "{0} requested this run and may not approve it (tokens.self_approval is off, or a protected host is in the plan)"
    )]
    SelfApproval(String),
    /// The approver named another plan.
    #[error("approval names operation hash {got}, the plan's is {expected}")]
    WrongPlan {
        /// The plan's hash.
        expected: String,
        /// The hash the approver named.
        got: String,
    },
}

/// A refused approval, handing the unchanged collection back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// The collection as it was.
    pub pending: PendingApproval,
    /// Why.
    pub error: ApprovalError,
}

impl PendingApproval {
    /// Starts collecting for `request` (a `required` of 0 is treated as 1).
    pub fn new(mut request: ApprovalRequest) -> Self {
        request.required = request.required.clamp(1, 2);
        PendingApproval {
            request,
            approvers: Vec::new(),
        }
    }

    /// The request.
    pub fn request(&self) -> &ApprovalRequest {
        &self.request
    }

    /// Approvers recorded so far.
    pub fn approvers(&self) -> &[String] {
        &self.approvers
    }

    /// Records `identity`'s approval of `operation_hash`.
    pub fn approve(
        mut self,
        identity: &str,
        operation_hash: &str,
        authorization: &Authorization,
    ) -> Result<ApprovalProgress, Box<Refused>> {
        if operation_hash != self.request.operation_hash {
            let error = ApprovalError::WrongPlan {
                expected: self.request.operation_hash.clone(),
                got: operation_hash.to_owned(),
            };
            return Err(Box::new(Refused {
                pending: self,
                error,
            }));
        }
        if !authorization.has_role(identity, Role::Approver) {
            return Err(Box::new(Refused {
                pending: self,
                error: ApprovalError::NotAnApprover(identity.to_owned()),
            }));
        }
        if !self.request.self_approval && self.request.requesters.iter().any(|r| r == identity) {
            return Err(Box::new(Refused {
                pending: self,
                error: ApprovalError::SelfApproval(identity.to_owned()),
            }));
        }
        let counted = !self.approvers.iter().any(|a| a == identity);
        if counted {
            self.approvers.push(identity.to_owned());
        }
        if self.approvers.len() >= usize::from(self.request.required) {
            let mut approvers = self.approvers;
            approvers.sort();
            return Ok(ApprovalProgress::Complete(CompleteApproval {
                request: self.request,
                approvers,
            }));
        }
        Ok(ApprovalProgress::Pending {
            pending: self,
            counted,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    fn authz() -> Authorization {
        let mut g = BTreeMap::new();
        g.insert(
            "spiffe://f/operator/alice".to_owned(),
            BTreeSet::from([Role::Approver]),
        );
        g.insert(
            "spiffe://f/operator/bob".to_owned(),
            BTreeSet::from([Role::Approver]),
        );
        g.insert(
            "spiffe://f/operator/eve".to_owned(),
            BTreeSet::from([Role::Operator]),
        );
        Authorization::new(g)
    }

    fn request(required: u8) -> PendingApproval {
        PendingApproval::new(ApprovalRequest {
            run_id: Uuid::from_u128(1),
            operation_hash: "h".into(),
            required,
            requesters: vec!["spiffe://f/operator/carol".into()],
            self_approval: false,
        })
    }

    #[test]
    fn the_requester_may_not_approve_unless_policy_allows_it() {
        let mut a = authz();
        a = Authorization::new(
            a.grants()
                .clone()
                .into_iter()
                .chain([(
                    "spiffe://f/operator/carol".to_owned(),
                    BTreeSet::from([Role::Approver]),
                )])
                .collect(),
        );
        let refused = request(1)
            .approve("spiffe://f/operator/carol", "h", &a)
            .unwrap_err();
        assert_eq!(
            refused.error,
            ApprovalError::SelfApproval("spiffe://f/operator/carol".into())
        );
        assert!(refused.pending.approvers().is_empty());
        let mut allowed = request(1);
        allowed.request.self_approval = true;
        assert!(matches!(
            allowed.approve("spiffe://f/operator/carol", "h", &a),
            Ok(ApprovalProgress::Complete(_))
        ));
    }

    #[test]
    fn two_distinct_approvers_complete_and_the_same_one_twice_does_not() {
        let a = authz();
        let ApprovalProgress::Pending { pending, counted } = request(2)
            .approve("spiffe://f/operator/bob", "h", &a)
            .unwrap()
        else {
            panic!("one approver must not complete a two-approver request")
        };
        assert!(counted);
        let ApprovalProgress::Pending { pending, counted } =
            pending.approve("spiffe://f/operator/bob", "h", &a).unwrap()
        else {
            panic!("the same approver twice must not complete")
        };
        assert!(!counted);
        assert_eq!(pending.approvers().len(), 1);
        let ApprovalProgress::Complete(done) = pending
            .approve("spiffe://f/operator/alice", "h", &a)
            .unwrap()
        else {
            panic!("a second distinct approver completes")
        };
        assert_eq!(
            done.approvers,
            vec!["spiffe://f/operator/alice", "spiffe://f/operator/bob"]
        );
    }

    #[test]
    fn one_approver_completes_a_single_approval() {
        assert!(matches!(
            request(1).approve("spiffe://f/operator/alice", "h", &authz()),
            Ok(ApprovalProgress::Complete(_))
        ));
    }

    #[test]
    fn refuses_non_approvers_and_other_plans_without_losing_state() {
        let a = authz();
        let refused = request(2)
            .approve("spiffe://f/operator/eve", "h", &a)
            .unwrap_err();
        assert_eq!(
            refused.error,
            ApprovalError::NotAnApprover("spiffe://f/operator/eve".into())
        );
        let refused = refused
            .pending
            .approve("spiffe://f/operator/alice", "other", &a)
            .unwrap_err();
        assert!(matches!(refused.error, ApprovalError::WrongPlan { .. }));
        assert!(refused.pending.approvers().is_empty());
    }
}
