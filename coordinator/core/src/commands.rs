//! The CLI commands the core tells an operator to run next. Defined here, once, so the text
//! an answer prints is exactly what the CLI parses.
//!
//! | situation | command |
//! |---|---|
//! | quick mode met a destructive step | `tollgate ACTION --mode full --hosts H1,H2 --run RUN_ID [--shadow]` |
//! | a full plan waits for approval | `tollgate approve RUN_ID --operation-hash HASH` |
//! | a token was issued | `tollgate execute RUN_ID --token TOKEN` |
//!
//! Hosts are sorted and de-duplicated. Every part is shell-safe without quoting: host names
//! are DNS labels, run ids are UUIDs, hashes are hex, tokens are base64url and dots. The
//! escalation command re-submits the same run id in full mode, which the service answers with
//! `ConfirmationRequired` for that run's plan.

use std::collections::BTreeSet;

use tollgate_protocol::Action;
use uuid::Uuid;

/// `tollgate ACTION --mode full --hosts H1,H2 --run RUN_ID`, with `--shadow` for a shadow run
/// (a run keeps the shape it was born with: followed literally, the command continues it as
/// shadow; the service refuses a continuation that drops or adds the flag).
pub fn escalation_command(action: Action, hosts: &[String], run_id: Uuid, shadow: bool) -> String {
    let hosts: BTreeSet<&str> = hosts.iter().map(String::as_str).collect();
    let hosts: Vec<&str> = hosts.into_iter().collect();
    let shadow = if shadow { " --shadow" } else { "" };
    format!(
        "tollgate {action} --mode full --hosts {} --run {run_id}{shadow}",
        hosts.join(",")
    )
}

/// `tollgate approve RUN_ID --operation-hash HASH`.
pub fn approve_command(run_id: Uuid, operation_hash: &str) -> String {
    format!("tollgate approve {run_id} --operation-hash {operation_hash}")
}

/// `tollgate execute RUN_ID --token TOKEN`.
pub fn execute_command(run_id: Uuid, token: &str) -> String {
    format!("tollgate execute {run_id} --token {token}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escalation_sorts_and_dedups_hosts() {
        let id = Uuid::from_u128(7);
        let cmd = escalation_command(
            Action::Teardown,
            &["web2".into(), "web1".into(), "web2".into()],
            id,
            false,
        );
        assert_eq!(
            cmd,
            format!("tollgate teardown --mode full --hosts web1,web2 --run {id}")
        );
        assert_eq!(
            escalation_command(Action::Teardown, &["web1".into()], id, true),
            format!("tollgate teardown --mode full --hosts web1 --run {id} --shadow")
        );
        let safe = |c: char| c.is_ascii_alphanumeric() || " -_,.=".contains(c);
        assert!(cmd.chars().all(safe), "{cmd}");
        assert_eq!(
            approve_command(id, "ab12"),
            format!("tollgate approve {id} --operation-hash ab12")
        );
        assert_eq!(
            execute_command(id, "tg1.a.b"),
            format!("tollgate execute {id} --token tg1.a.b")
        );
    }
}
