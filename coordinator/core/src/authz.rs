//! Who may ask for what. The control port accepts any operator certificate of the fleet; this
//! table decides what each identity may do with it.
//!
//! | request | role needed |
//! |---|---|
//! | submit an intent (`deploy`, `teardown`), `execute` a token, `cancel` a run | `operator` |
//! | `approve` a plan | `approver` |
//! | `status`, `plan show`, `runs list/show/verify`, `explain` | `viewer` (any role grants it) |

use tollgate_protocol::ctl::CtlRequest;

use crate::config::{Authorization, Role};

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{identity} may not {action}: it needs the {needed} role")]
pub struct Denied {
    pub identity: String,
    pub action: &'static str,
    pub needed: &'static str,
}

/// The role a request needs, and a verb for the refusal message.
pub fn required_role(req: &CtlRequest) -> (Role, &'static str) {
    match req {
        CtlRequest::Submit(_) => (Role::Operator, "submit intents"),
        CtlRequest::Execute { .. } => (Role::Operator, "execute plans"),
        CtlRequest::Cancel { .. } => (Role::Operator, "cancel runs"),
        CtlRequest::Approve { .. } => (Role::Approver, "approve plans"),
        CtlRequest::Hello(_) => (Role::Viewer, "connect"),
        CtlRequest::PlanShow { .. } => (Role::Viewer, "view plans"),
        CtlRequest::Status => (Role::Viewer, "view fleet status"),
        CtlRequest::RunsList | CtlRequest::RunsShow { .. } => (Role::Viewer, "view runs"),
        CtlRequest::RunsVerify { .. } => (Role::Viewer, "verify runs"),
        CtlRequest::RunsDiff { .. } => (Role::Viewer, "compare runs"),
        CtlRequest::Explain { .. } => (Role::Viewer, "read explanations"),
    }
}

/// Allows `req` for `identity`, or says who lacks what. Unknown identities hold no role.
pub fn authorize(table: &Authorization, identity: &str, req: &CtlRequest) -> Result<(), Denied> {
    let (needed, action) = required_role(req);
    let ok = match needed {
        Role::Viewer => [Role::Viewer, Role::Operator, Role::Approver]
            .iter()
            .any(|r| table.has_role(identity, *r)),
        other => table.has_role(identity, other),
    };
    if ok {
        Ok(())
    } else {
        Err(Denied {
            identity: identity.to_string(),
            action,
            needed: needed.as_str(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    #[test]
    fn each_request_needs_its_role() {
        let table = Authorization::new(BTreeMap::from([
            ("op".to_string(), BTreeSet::from([Role::Operator])),
            ("ap".to_string(), BTreeSet::from([Role::Approver])),
            ("vw".to_string(), BTreeSet::from([Role::Viewer])),
        ]));
        let approve = CtlRequest::Approve {
            run_id: uuid::Uuid::nil(),
            operation_hash: String::new(),
        };
        let execute = CtlRequest::Execute {
            run_id: uuid::Uuid::nil(),
            token: String::new(),
        };
        assert!(authorize(&table, "op", &execute).is_ok());
        assert!(
            authorize(&table, "op", &approve).is_err(),
            "an operator cannot approve"
        );
        assert!(authorize(&table, "ap", &approve).is_ok());
        assert!(
            authorize(&table, "ap", &execute).is_err(),
            "an approver cannot execute"
        );
        assert!(authorize(&table, "vw", &CtlRequest::Status).is_ok());
        assert!(authorize(&table, "vw", &execute).is_err());
        assert!(
            authorize(&table, "op", &CtlRequest::Status).is_ok(),
            "any role can view"
        );
        let denied = authorize(&table, "stranger", &CtlRequest::Status).unwrap_err();
        assert_eq!(denied.needed, "viewer");
        assert!(denied.to_string().contains("stranger"));
    }
}
